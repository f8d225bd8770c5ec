"""The operator run as a local process against a cluster, exactly as its image runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from ampacity.cluster.localcluster import free_port
from ampacity.cluster.polling import wait_for


class LocalOperator:
    """`kopf run -m controllers` with its own metrics and health ports and a log file."""

    def __init__(self, kubeconfig: Path, log: Path) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.metrics_port = free_port()
        self.health_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 60) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "AMPACITY_METRICS_PORT": str(self.metrics_port),
        }
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kopf",
                    "run",
                    "-m",
                    "controllers",
                    "--standalone",
                    "--all-namespaces",
                    f"--liveness=http://127.0.0.1:{self.health_port}/healthz",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._healthy, timeout=timeout, what=f"operator health (log: {self.log})")

    def _healthy(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(f"operator exited with {self._process.returncode}; log: {self.log}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """Stop it abruptly, as a crash or an evicted pod would."""
        assert self._process is not None
        self._process.kill()
        self._process.wait()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def metrics(self) -> str:
        return httpx.get(self.metrics_url, timeout=5).text
