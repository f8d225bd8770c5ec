"""A serving pool as local processes: `ampacity serving engine` instances behind the real
`vllm-router` binary, on 127.0.0.1. The end-to-end benchmark and the integration tests run pools
this way (kwok's pods run no containers).

`static_router_args` turns the router arguments a ServingPool's Deployment carries (Kubernetes
service discovery) into the same router with the local engines' URLs, so what runs here is what the
operator configured, less the discovery.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# Flags of the Deployment's router that only make sense in the cluster: (flag, values it takes).
_DISCOVERY_FLAGS = {
    "--service-discovery": 0,
    "--service-discovery-namespace": 1,
    "--service-discovery-port": 1,
}
_SELECTOR_FLAGS = ("--selector", "--prefill-selector", "--decode-selector")
_LOCAL_VALUES = ("--host", "--port", "--prometheus-host", "--prometheus-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def router_binary() -> str:
    found = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    if not Path(found).exists():
        raise FileNotFoundError("vllm-router is not installed (pip install vllm-router)")
    return found


def static_router_args(
    args: Sequence[str],
    port: int,
    metrics_port: int,
    workers: Sequence[str] = (),
    prefill: Sequence[str] = (),
    decode: Sequence[str] = (),
) -> list[str]:
    """The Deployment's router arguments with discovery replaced by local URLs on 127.0.0.1."""
    out: list[str] = []
    values = {"--host": "127.0.0.1", "--port": str(port), "--prometheus-host": "127.0.0.1"}
    values["--prometheus-port"] = str(metrics_port)
    i = 0
    while i < len(args):
        flag = args[i]
        if flag in _DISCOVERY_FLAGS:
            i += 1 + _DISCOVERY_FLAGS[flag]
        elif flag in _SELECTOR_FLAGS:
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                i += 1
        elif flag in _LOCAL_VALUES:
            out += [flag, values.pop(flag)]
            i += 2
        else:
            out.append(flag)
            i += 1
    for flag, value in values.items():
        out += [flag, value]
    if workers:
        out += ["--worker-urls", *workers]
    for url in prefill:
        out += ["--prefill", url]
    for url in decode:
        out += ["--decode", url]
    # Workers are up before the router starts here: check them every second, not every 30 s.
    return [*out, "--worker-startup-check-interval", "1", "--log-level", "warning"]


def replace_flag(args: Sequence[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


@dataclass
class LocalProcess:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    port: int
    request_log: Path | None = None
    side_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[dict[str, Any]]:
        if self.request_log is None or not self.request_log.exists():
            return []
        return [json.loads(line) for line in self.request_log.read_text().splitlines() if line.strip()]

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class LocalPool:
    """Engines and a router under `workdir`; `close()` (or the context manager) stops them all."""

    workdir: Path
    time_scale: float = 1.0
    processes: list[LocalProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _start(
        self, name: str, argv: list[str], env: dict[str, str], port: int, **extra: Any
    ) -> LocalProcess:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
        proc = LocalProcess(name, process, log, port, **extra)
        self.processes.append(proc)
        return proc

    def engine(
        self,
        name: str,
        serve_args: Sequence[str],
        gpu: str = "h100",
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> LocalProcess:
        """An engine from `vllm serve` arguments (a Deployment's), on `port` (default: a free one),
        with the Deployment's plain `env` values."""
        port, side = port or free_port(), free_port()
        args = replace_flag(serve_args, "--port", str(port))
        request_log = self.workdir / f"{name}.requests.jsonl"
        argv = [
            sys.executable, "-m", "ampacity.cli", "serving", "engine", *args,
            "--host", "127.0.0.1", "--gpu", gpu, "--time-scale", str(self.time_scale),
            "--request-log", str(request_log),
        ]  # fmt: skip
        local = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1", "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side)}
        proc = self._start(
            name, argv, {**(env or {}), **local}, port, request_log=request_log, side_port=side
        )
        wait_healthy(proc)
        return proc

    def router(
        self, deployment_args: Sequence[str], port: int | None = None, **urls: Sequence[str]
    ) -> LocalProcess:
        port, metrics = port or free_port(), free_port()
        argv = [router_binary(), *static_router_args(deployment_args, port, metrics, **urls)]
        proc = self._start("router", argv, {}, port)
        proc.side_port = metrics
        wait_healthy(proc, path="/v1/models")
        return proc

    def activator(
        self,
        deployment_args: Sequence[str],
        extra: Sequence[str],
        env: dict[str, str],
        port: int | None = None,
    ) -> LocalProcess:
        """`ampacity activator` with an activator Deployment's arguments, listening on 127.0.0.1."""
        port = port or free_port()
        args = [*replace_flag(deployment_args, "--listen", f"127.0.0.1:{port}"), *extra]
        argv = [sys.executable, "-m", "ampacity.cli", "activator", *args]
        proc = self._start("activator", argv, env, port)
        wait_healthy(proc, path="/activator/healthz")
        return proc

    def close(self) -> None:
        for proc in reversed(self.processes):
            if proc.alive():
                proc.process.terminate()
                try:
                    proc.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.process.kill()
                    proc.process.wait(timeout=10)


def wait_healthy(proc: LocalProcess, path: str = "/health", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.process.returncode}; log: {proc.log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(proc.url + path, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name} not healthy after {timeout}s; log: {proc.log}")


def stop(proc: LocalProcess, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    proc.process.send_signal(sig)
    return proc.process.wait(timeout=timeout)


def engine_serve_args(model: str, served: str, tp: int, role: str | None) -> list[str]:
    """`vllm serve` arguments like a ServingPool's (for pools run without a cluster)."""
    args = [model, "--port", "0", "--tensor-parallel-size", str(tp), "--served-model-name", served]
    if role in ("prefill", "decode"):
        kv_role = {"prefill": "kv_producer", "decode": "kv_consumer"}[role]
        args += ["--kv-transfer-config", json.dumps({"kv_connector": "NixlConnector", "kv_role": kv_role})]
    return args


def iter_requests(processes: Sequence[LocalProcess]) -> Iterator[dict[str, Any]]:
    for proc in processes:
        for record in proc.requests():
            yield {**record, "engine": proc.name}
