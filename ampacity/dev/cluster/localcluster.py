"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok (which plays the kubelets of fake GPU nodes).

`ampacity cluster up|down` and the test suite's session fixture both use this
class. The processes run in their own sessions so the cluster outlives the
command that started it; `state.json` in the state folder records them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml

from ampacity.dev.cluster.binaries import Binaries, ensure_binaries, kwok_stage_documents
from ampacity.dev.cluster.nodes import GpuNodeShape, gpu_node
from ampacity.dev.cluster.pki import Pki

Progress = Callable[[str], None]

DEFAULT_STATE_DIR = Path(
    os.environ.get("AMPACITY_CLUSTER_DIR", Path.home() / ".cache" / "ampacity" / "cluster")
)
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"


class ClusterError(RuntimeError):
    """The local control plane could not be started or reached."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _has_default_route() -> bool:
    with contextlib.suppress(OSError), Path("/proc/net/route").open() as routes:
        return any(line.split()[1] == "00000000" for line in list(routes)[1:])
    return False


@dataclass
class ClusterState:
    """What `up` started, so that `down` (possibly another process) can stop it."""

    apiserver_port: int
    pids: dict[str, int] = field(default_factory=dict)


class LocalCluster:
    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR, progress: Progress | None = None) -> None:
        self.state_dir = state_dir
        self.pki = Pki(state_dir / "pki")
        self._progress = progress or (lambda _message: None)

    # -- paths ---------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    def state(self) -> ClusterState | None:
        if not self._state_file.exists():
            return None
        return ClusterState(**json.loads(self._state_file.read_text()))

    @property
    def server(self) -> str:
        state = self.state()
        if state is None:
            raise ClusterError(f"no cluster is running from {self.state_dir}")
        return f"https://127.0.0.1:{state.apiserver_port}"

    # -- lifecycle -----------------------------------------------------------------------------

    def is_running(self) -> bool:
        state = self.state()
        return state is not None and all(_alive(pid) for pid in state.pids.values())

    def up(self, nodes: int = 4, shape: GpuNodeShape | None = None, timeout: float = 120.0) -> None:
        """Start every component and register `nodes` fake GPU servers; a no-op when already up."""
        if self.is_running():
            self._progress(f"cluster already running: KUBECONFIG={self.kubeconfig}")
            return
        self.down()
        binaries = ensure_binaries()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.pki.create()
        state = ClusterState(apiserver_port=free_port())
        self._write_kubeconfig(state.apiserver_port)
        try:
            self._start_all(binaries, state, timeout)
            self.add_nodes(nodes, shape or GpuNodeShape())
        except BaseException:
            self.down()
            raise
        self._progress(f"cluster up: export KUBECONFIG={self.kubeconfig}")

    def down(self) -> None:
        """Stop every component started by `up` and forget the cluster's data."""
        state = self.state()
        if state is not None:
            for name, pid in reversed(list(state.pids.items())):
                _terminate(pid)
                self._progress(f"stopped {name}")
            self._state_file.unlink()
        shutil.rmtree(self.state_dir / "etcd", ignore_errors=True)

    # -- internals -----------------------------------------------------------------------------

    def _start_all(self, binaries: Binaries, state: ClusterState, timeout: float) -> None:
        pki = self.pki
        etcd_port, etcd_peer = free_port(), free_port()
        self._spawn(
            state,
            "etcd",
            [
                binaries["etcd"],
                "--name=local",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=local=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync=true",
                "--auto-compaction-retention=1",
                "--quota-backend-bytes=8589934592",
                "--log-level=warn",
            ],
        )
        self._wait("etcd", f"http://127.0.0.1:{etcd_port}/health", timeout, state)

        apiserver_flags = [
            binaries["kube-apiserver"],
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            f"--secure-port={state.apiserver_port}",
            f"--tls-cert-file={pki.apiserver.cert}",
            f"--tls-private-key-file={pki.apiserver.key}",
            f"--client-ca-file={pki.ca.cert}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.service_account_pub}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            "--profiling=false",
            # Loopback is not a valid advertise address; without a default route to derive
            # one from, advertise the service VIP and skip the endpoint reconciler.
            *(
                []
                if _has_default_route()
                else ["--advertise-address=10.96.0.1", "--endpoint-reconciler-type=none"]
            ),
        ]
        self._spawn(state, "kube-apiserver", apiserver_flags)
        self._wait("kube-apiserver", f"{self.server}/readyz", timeout, state, authenticated=True)

        common = [
            "--kubeconfig=" + str(self.kubeconfig),
            "--bind-address=127.0.0.1",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
        ]
        kcm_port, scheduler_port = free_port(), free_port()
        self._spawn(
            state,
            "kube-controller-manager",
            [
                binaries["kube-controller-manager"],
                *common,
                f"--secure-port={kcm_port}",
                "--leader-elect=false",
                f"--service-account-private-key-file={pki.service_account_key}",
                f"--root-ca-file={pki.ca.cert}",
                "--use-service-account-credentials=false",
                f"--cluster-signing-cert-file={pki.ca.cert}",
                f"--cluster-signing-key-file={pki.ca.key}",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--concurrent-gc-syncs=10",
            ],
        )
        self._spawn(
            state,
            "kube-scheduler",
            [
                binaries["kube-scheduler"],
                *common,
                f"--secure-port={scheduler_port}",
                "--leader-elect=false",
            ],
        )
        kwok_config = self.state_dir / "kwok.yaml"
        kwok_config.write_text("---\n".join(kwok_stage_documents(binaries.kwok_stages)))
        self._spawn(
            state,
            "kwok",
            [
                binaries["kwok"],
                f"--kubeconfig={self.kubeconfig}",
                f"--config={kwok_config}",
                "--manage-all-nodes=true",
                f"--cidr={POD_CIDR}",
                "--node-ip=10.0.0.1",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{free_port()}",
            ],
        )
        self._wait("kube-controller-manager", f"https://127.0.0.1:{kcm_port}/healthz", timeout, state)
        self._wait("kube-scheduler", f"https://127.0.0.1:{scheduler_port}/healthz", timeout, state)

    def _spawn(self, state: ClusterState, name: str, argv: list[str]) -> None:
        self._progress(f"starting {name}")
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        state.pids[name] = process.pid
        self._state_file.write_text(json.dumps(asdict(state)))

    def _wait(
        self, name: str, url: str, timeout: float, state: ClusterState, authenticated: bool = False
    ) -> None:
        verify: bool | ssl.SSLContext = self._admin_tls() if authenticated else False
        deadline = time.monotonic() + timeout
        with httpx.Client(verify=verify, timeout=5) as client:
            while time.monotonic() < deadline:
                if not _alive(state.pids[name]):
                    raise ClusterError(f"{name} exited; see {self.logs / (name + '.log')}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        self._progress(f"{name} ready")
                        return
                time.sleep(0.25)
        raise ClusterError(f"{name} not healthy after {timeout:.0f}s; see {self.logs / (name + '.log')}")

    def _write_kubeconfig(self, port: int) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "ampacity-local",
                    "cluster": {
                        "server": f"https://127.0.0.1:{port}",
                        "certificate-authority": str(self.pki.ca.cert),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(self.pki.admin.cert),
                        "client-key": str(self.pki.admin.key),
                    },
                }
            ],
            "contexts": [
                {"name": "ampacity-local", "context": {"cluster": "ampacity-local", "user": "admin"}}
            ],
            "current-context": "ampacity-local",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))

    def add_nodes(self, count: int, shape: GpuNodeShape, first_index: int = 0) -> None:
        """Register `count` fake GPU servers, `gpu-node-<first_index>` on (`up` registers the first)."""
        with self.http() as client:

            def create(index: int) -> None:
                node = gpu_node(f"gpu-node-{index}", index, shape)
                response = client.post("/api/v1/nodes", json=node)
                if response.status_code not in (201, 409):
                    raise ClusterError(f"creating node {node['metadata']['name']}: {response.text}")

            # A few creates in flight: hundreds of nodes one at a time took minutes on 2 cores.
            with futures.ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(create, range(first_index, first_index + count)))
        self._progress(f"registered {count} fake {shape.gpu_type} nodes with {shape.gpus} GPUs each")

    @contextlib.contextmanager
    def http(self) -> Iterator[httpx.Client]:
        """An admin HTTP client for the API server (for setup steps that need no typed client)."""
        with httpx.Client(base_url=self.server, verify=self._admin_tls(), timeout=30) as client:
            yield client

    def _admin_tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        context.load_cert_chain(str(self.pki.admin.cert), str(self.pki.admin.key))
        return context


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as dead.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return True


def _terminate(pid: int, grace: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
