"""The operator run as a local process against a cluster, exactly as its image runs it."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx

from ampacity.dev.cluster.localcluster import free_port
from ampacity.dev.cluster.polling import wait_for


class LocalOperator:
    """`kopf run -m controllers` with its own metrics and health ports and a log file."""

    def __init__(self, kubeconfig: Path, log: Path, env: Mapping[str, str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        #: Extra environment for the operator process (e.g. AMPACITY_AGGREGATOR_URL_OVERRIDE), applied
        #: on every start.
        self.env = dict(env or {})
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.report_port = free_port()
        self.power_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The operator process's id while it runs (for /proc readings)."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def report_url(self) -> str:
        """Where the trainer reports go (the test process plays the trainer)."""
        return f"http://127.0.0.1:{self.report_port}"

    @property
    def power_url(self) -> str:
        """Where node agents send fast telemetry (the power telemetry endpoint)."""
        return f"http://127.0.0.1:{self.power_port}"

    def _token_key(self) -> str:
        """The operator key, kept beside the kubeconfig so restarts derive the same tokens."""
        path = self.kubeconfig.parent / "operator-token.key"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def start(self, timeout: float = 60) -> None:
        env = {
            **os.environ,
            **self.env,
            "KUBECONFIG": str(self.kubeconfig),
            "AMPACITY_METRICS_PORT": str(self.metrics_port),
            "AMPACITY_REPORT_PORT": str(self.report_port),
            "AMPACITY_POWER_PORT": str(self.power_port),
            "AMPACITY_TOKEN_KEY": self._token_key(),
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
