"""PowerBudget end to end: node agents as local processes with simulated GPUs, the operator,
and the chart's agent RBAC and admission policy on the local control plane.

Budget applied -> caps assigned -> agents enforce -> status and metrics agree; an agent
killed -> its telemetry counted stale; the operator killed -> agents fail safe on their own;
power falls -> caps released with hysteresis; an agent cannot write another node's object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agents.gpu import SimulatedGpuBackend
from agents.podresources.v1 import api_pb2, api_pb2_grpc
from ampacity.dev.cluster.binaries import ensure_binaries
from ampacity.dev.cluster.kubectl import Kubectl, condition
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.localcluster import LocalCluster, free_port
from ampacity.dev.cluster.pki import CertPair
from ampacity.dev.cluster.polling import wait_for

REPO = Path(__file__).resolve().parents[2]
NODES = [f"gpu-node-{i}" for i in range(4)]
AGENT_GROUP = "ampacity:node-agents"
BUDGET = "power-e2e"
VAP_API = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"
#: The chart is rendered as its own release, so nothing clashes with the Helm tests' install.
RELEASE, RELEASE_NAMESPACE = "e2e", "ampacity-e2e"
AGENT_SA = f"{RELEASE}-ampacity-node-agent"
AGENT_KINDS = (
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
)


def agent_kubeconfig(cluster: LocalCluster, node: str, directory: Path) -> Path:
    """Credentials of the agent of `node`: user ampacity:node-agent:<node> in the agents' group."""
    pair = cluster.pki.issue(
        CertPair(directory / f"{node}.crt", directory / f"{node}.key"),
        f"ampacity:node-agent:{node}",
        AGENT_GROUP,
    )
    path = directory / f"{node}.kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "local",
                        "cluster": {
                            "server": cluster.server,
                            "certificate-authority": str(cluster.pki.ca.cert),
                        },
                    }
                ],
                "users": [
                    {
                        "name": node,
                        "user": {"client-certificate": str(pair.cert), "client-key": str(pair.key)},
                    }
                ],
                "contexts": [{"name": node, "context": {"cluster": "local", "user": node}}],
                "current-context": node,
            }
        )
    )
    return path


#: The UUIDs the simulated backend gives GPUs 0-7 (the same on every node).
UUIDS = [SimulatedGpuBackend(8).uuid(i) for i in range(8)]


class Kubelet(api_pb2_grpc.PodResourcesListerServicer):
    """A node's kubelet pod-resources API (the real proto, on a unix socket): answers `List`
    with the GPU allocations the test makes, as the device plugin would have made them."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self._pods: dict[tuple[str, str], list[str]] = {}
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix://{socket}")
        self._server.start()

    def allocate(self, namespace: str, pod: str, gpus: Iterable[int]) -> None:
        with self._lock:
            self._pods[(namespace, pod)] = [UUIDS[i] for i in gpus]

    def release(self, namespace: str, pod: str) -> None:
        with self._lock:
            self._pods.pop((namespace, pod), None)

    def List(  # the proto's method name
        self, request: api_pb2.ListPodResourcesRequest, context: grpc.ServicerContext
    ) -> api_pb2.ListPodResourcesResponse:
        with self._lock:
            pods = dict(self._pods)
        return api_pb2.ListPodResourcesResponse(
            pod_resources=[
                api_pb2.PodResources(
                    name=name,
                    namespace=namespace,
                    containers=[
                        api_pb2.ContainerResources(
                            name="engine",
                            devices=[
                                api_pb2.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=uuids)
                            ],
                        )
                    ],
                )
                for (namespace, name), uuids in sorted(pods.items())
            ]
        )

    def stop(self) -> None:
        self._server.stop(None)


class AgentProcess:
    """`python -m agents` for one node, with simulated GPUs whose load a JSON file sets, a
    kubelet pod-resources API of its own, and the operator's power telemetry endpoint."""

    def __init__(self, node: str, kubeconfig: Path, directory: Path, operator_url: str) -> None:
        self.node = node
        self.operator_url = operator_url
        self.kubelet = Kubelet(directory / f"{node}-kubelet.sock")
        self.kubeconfig = kubeconfig
        self.load_file = directory / f"{node}-load.json"
        self.log = directory / f"{node}.log"
        self.metrics_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.set_load(0.0)

    def set_load(self, prompt: float, token: float = 0.0, nvml_fault: str = "") -> None:
        """Busy fractions of every GPU; `nvml_fault` makes every NVML call fail with that error."""
        tmp = self.load_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"prompt": prompt, "token": token, "nvml": nvml_fault}))
        tmp.replace(self.load_file)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agents",
                    f"--node={self.node}",
                    "--simulate",
                    f"--load-file={self.load_file}",
                    f"--kubeconfig={self.kubeconfig}",
                    f"--metrics-port={self.metrics_port}",
                    "--metrics-address=127.0.0.1",
                    f"--pod-resources-socket={self.kubelet.socket}",
                    "--interval=0.5",
                    f"--operator-url={self.operator_url}",
                ],
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> dict[tuple[str, str], float]:
        """(metric, gpu) -> value of the agent's per-GPU series."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        return {
            (s.name, s.labels.get("gpu", "")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@pytest.fixture(scope="module")
def agent_policy(
    cluster: LocalCluster, kubectl: Kubectl, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The chart's agent ClusterRole, binding and admission policy, applied as rendered."""
    rendered = subprocess.run(
        [
            ensure_binaries(verbose=False)["helm"],
            "template",
            RELEASE,
            str(REPO / "helm" / "ampacity"),
            f"--namespace={RELEASE_NAMESPACE}",
            "--set=nodeAgent.enabled=true",
            f"--api-versions={VAP_API}",
            "--show-only=templates/node-agent.yaml",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    documents = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in AGENT_KINDS]
    assert sorted(d["kind"] for d in documents) == sorted(AGENT_KINDS)
    manifest = yaml.safe_dump_all(documents)
    kubectl.run("create", "namespace", RELEASE_NAMESPACE)
    kubectl("apply", "-f", "-", stdin=manifest)
    # The API server loads a new admission policy a moment after it is created: wait until it
    # denies a (dry-run) write, so that the tests see it in force from their first request.
    probe = {
        "apiVersion": "ampacity.dev/v1alpha1",
        "kind": "NodePower",
        "metadata": {"name": "probe"},
        "spec": {},
    }
    assert kubectl.apply(probe).returncode == 0
    agent = Kubectl(agent_kubeconfig(cluster, "gpu-node-0", tmp_path_factory.mktemp("probe")))
    wait_for(
        lambda: (
            "own node"
            in agent.run(
                "patch",
                "nodepower",
                "probe",
                "--subresource=status",
                "--type=merge",
                "--dry-run=server",
                "-p",
                "{}",
            ).stderr
        ),
        timeout=30,
        what="admission policy in force",
    )
    kubectl("delete", "nodepower", "probe")
    yield manifest
    kubectl.run("delete", "-f", "-", "--wait=false", stdin=manifest)
    kubectl.run("delete", "namespace", RELEASE_NAMESPACE, "--wait=false")


@pytest.fixture(scope="module")
def agents(
    cluster: LocalCluster,
    agent_policy: str,
    operator: LocalOperator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, AgentProcess]]:
    directory = tmp_path_factory.mktemp("agents")
    processes = {
        node: AgentProcess(node, agent_kubeconfig(cluster, node, directory), directory, operator.power_url)
        for node in NODES
    }
    for process in processes.values():
        process.start()
    try:
        yield processes
    finally:
        for process in processes.values():
            process.stop()
            process.kubelet.stop()


def budget_manifest(release_hold: str) -> dict[str, Any]:
    return {
        "apiVersion": "ampacity.dev/v1alpha1",
        "kind": "PowerBudget",
        "metadata": {"name": BUDGET},
        "spec": {
            "nodeSelector": {"matchLabels": {"ampacity.dev/row": "row-a"}},
            # 32 H100s: 22.4 kW flat out, 2.4 kW idle. T1 17 kW, T2 19 kW.
            "limitWatts": 20000,
            "thresholds": {"t1": 0.85, "t2": 0.95},
            "safeCapWatts": 450,
            "telemetryStaleness": "10s",  # the default; 5 s left no margin on a loaded 2-core machine
            "releaseHold": release_hold,
        },
    }


def node_powers(kubectl: Kubectl) -> dict[str, dict[str, Any]]:
    items = kubectl.json("get", "nodepowers")["items"]
    return {o["metadata"]["name"]: o for o in items if o["metadata"]["name"] in NODES}


def enforced(objs: dict[str, dict[str, Any]]) -> bool:
    """Every node reports limits equal to the caps its spec assigns."""
    for obj in objs.values():
        caps = {g["index"]: g["capWatts"] for g in obj["spec"].get("gpus", [])}
        limits = {g["index"]: g["limitWatts"] for g in obj.get("status", {}).get("gpus", [])}
        if not caps or caps != limits:
            return False
    return len(objs) == len(NODES)


def braked(objs: dict[str, dict[str, Any]]) -> bool:
    """Batch GPUs at their floor, interactive ones uncapped: the answer to a surge above T2."""
    return all(
        (g["priority"], g["capped"], g["capWatts"]) in {("interactive", False, 700.0), ("batch", True, 200.0)}
        for obj in objs.values()
        for g in obj["spec"]["gpus"]
    )


def operator_gauge(operator: LocalOperator, name: str) -> float | None:
    for family in text_string_to_metric_families(operator.metrics()):
        for s in family.samples:
            if s.name == name and s.labels.get("name") == BUDGET:
                return s.value
    return None


def events(kubectl: Kubectl) -> str:
    return kubectl("get", "events", "-A", "--field-selector", f"involvedObject.name={BUDGET}")


def test_budget_caps_agents_enforce_and_fail_safe(
    kubectl: Kubectl, operator: LocalOperator, agents: dict[str, AgentProcess], namespace: str
) -> None:
    # An interactive pod holds gpu-node-0's GPUs; every other GPU is idle, i.e. batch.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "chat",
            "namespace": namespace,
            "labels": {"ampacity.dev/power-priority": "interactive"},
        },
        "spec": {
            "nodeName": "gpu-node-0",
            "containers": [
                {"name": "engine", "image": "engine", "resources": {"limits": {"nvidia.com/gpu": "8"}}}
            ],
        },
    }
    assert kubectl.apply(pod).returncode == 0
    wait_for(
        lambda: (kubectl.get("pod", "chat", namespace) or {}).get("status", {}).get("phase") == "Running",
        what="pod running",
    )
    agents["gpu-node-0"].kubelet.allocate(namespace, "chat", range(8))
    assert kubectl.apply(budget_manifest(release_hold="10m")).returncode == 0
    try:
        _scenario(kubectl, operator, agents)
    finally:
        agents["gpu-node-0"].kubelet.release(namespace, "chat")
        kubectl("delete", "powerbudget", BUDGET)
        wait_for(lambda: not node_powers(kubectl), timeout=30, what="NodePowers released")


def _scenario(kubectl: Kubectl, operator: LocalOperator, agents: dict[str, AgentProcess]) -> None:
    budget = wait_for(
        lambda: (
            (o := kubectl.get("powerbudget", BUDGET))
            and (condition(o) or {}).get("reason") == "Enforcing"
            and o
        ),
        what="budget enforcing with every agent reporting",
    )
    assert budget["status"]["nodes"] == 4 and budget["status"]["cappedGpus"] == 0
    objs = node_powers(kubectl)
    assert {o["metadata"]["ownerReferences"][0]["kind"] for o in objs.values()} == {"Node"}
    assert all(o["status"]["backend"] == "simulated" and not o["status"]["failsafe"] for o in objs.values())

    # Surge: every GPU flat out, 22.4 kW > T2. Batch GPUs brake to their floor (200 W), the
    # interactive ones are frozen at their draw (700 W, i.e. not capped).
    for agent in agents.values():
        agent.set_load(1.0)
    objs = wait_for(
        lambda: (o := node_powers(kubectl)) and enforced(o) and braked(o) and o,
        timeout=60,  # the reaction itself is benchmarked (bench-reaction); here, that it happens
        what="caps assigned and enforced",
    )
    for obj in objs.values():
        for g in obj["spec"]["gpus"]:
            assert (g["priority"], g["capped"], g["capWatts"]) in {
                ("interactive", False, 700.0),
                ("batch", True, 200.0),
            }
    assert all(g["priority"] == "interactive" for g in objs["gpu-node-0"]["spec"]["gpus"])
    expected = 8 * 700 + 24 * 200
    budget = wait_for(
        lambda: (
            (o := kubectl.get("powerbudget", BUDGET))
            and abs(o["status"]["currentWatts"] - expected) < 1
            and o
        ),
        what="budget status at the capped power",
    )
    status = budget["status"]
    assert status["cappedGpus"] == 24 and status["peakWatts"] > 19000 and status["overruns"] == 1
    assert sorted(c["node"] for c in status["cappedNodes"]) == NODES[1:]
    assert status["headroomWatts"] == pytest.approx(20000 - expected, abs=1)
    # Status, operator metrics and agent metrics agree.
    assert wait_for(
        lambda: abs((operator_gauge(operator, "ampacity_powerbudget_power_watts") or 0) - expected) < 1
    )
    assert operator_gauge(operator, "ampacity_powerbudget_capped_gpus") == 24
    agent_power = sum(
        v for a in agents.values() for (m, _), v in a.metrics().items() if m == "ampacity_gpu_power_watts"
    )
    assert agent_power == pytest.approx(expected, abs=1)
    assert agents["gpu-node-1"].metrics()[("ampacity_gpu_power_limit_watts", "0")] == 200.0
    # The samples went the fast way (the operator's power telemetry endpoint), not only etcd.
    for agent in agents.values():
        assert agent.metrics()[("ampacity_node_agent_fast_reports_total", "")] > 0
    crossings = events(kubectl)
    for reason in ("EnteredT1", "EnteredT2", "LimitExceeded"):
        assert reason in crossings, crossings

    # An agent dies: its node's telemetry goes stale and is counted at its limits.
    agents["gpu-node-3"].kill()
    wait_for(
        lambda: (condition(kubectl.get("powerbudget", BUDGET)) or {}).get("reason") == "TelemetryStale",
        timeout=30,
        what="budget notices the silent node",
    )
    assert "TelemetryStale" in events(kubectl)
    agents["gpu-node-3"].start()
    wait_for(
        lambda: (condition(kubectl.get("powerbudget", BUDGET)) or {}).get("reason") == "Enforcing",
        timeout=30,
        what="node reporting again",
    )

    # The operator dies: assignments age past the staleness and every agent fails safe on its
    # own, keeping the tighter of its last cap and the safe cap (450 W), and says so.
    operator.kill()
    try:
        objs = wait_for(
            lambda: (o := node_powers(kubectl)) and all(n["status"]["failsafe"] for n in o.values()) and o,
            timeout=30,
            what="agents in fail-safe",
        )
        for obj in objs.values():
            assert "old (allowed 10s)" in obj["status"]["failsafeReason"]
            assert condition(obj)["reason"] == "Failsafe"  # type: ignore[index]
        wait_for(
            lambda: all(
                g["limitWatts"] == (450.0 if n["metadata"]["name"] == "gpu-node-0" else 200.0)
                for n in node_powers(kubectl).values()
                for g in n["status"]["gpus"]
            ),
            timeout=10,
            what="safe caps enforced",
        )
        assert agents["gpu-node-0"].metrics()[("ampacity_node_failsafe", "")] == 1.0
    finally:
        operator.start()
    wait_for(
        lambda: (o := node_powers(kubectl)) and not any(n["status"]["failsafe"] for n in o.values()),
        timeout=30,
        what="agents back on the operator's assignment",
    )

    # Power falls: once it stayed below T1 - hysteresis for the hold window, caps come off in steps.
    # The restarted operator resumed the policy's memory (status.policyState): caps still hold.
    assert braked(node_powers(kubectl))
    kubectl("patch", "powerbudget", BUDGET, "--type=merge", "-p", json.dumps({"spec": {"releaseHold": "1s"}}))
    for agent in agents.values():
        agent.set_load(0.0)
    wait_for(
        lambda: (
            (o := kubectl.get("powerbudget", BUDGET))
            and o["status"]["cappedGpus"] == 0
            and not o["status"]["cappedNodes"]
        ),
        timeout=60,
        what="caps released",
    )
    wait_for(
        lambda: (
            enforced(node_powers(kubectl))
            and all(
                g["limitWatts"] == 700.0 for n in node_powers(kubectl).values() for g in n["status"]["gpus"]
            )
        ),
        timeout=15,
        what="agents back at full limits",
    )


def test_gpu_priorities_follow_the_kubelets_allocation(
    kubectl: Kubectl, operator: LocalOperator, agents: dict[str, AgentProcess], namespace: str
) -> None:
    """The kubelet gave an interactive pod GPUs 4-7 of gpu-node-1 (creation order would have
    said 0-3): the agent reports the pod on exactly those UUIDs and the budget classes them."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "half",
            "namespace": namespace,
            "labels": {"ampacity.dev/power-priority": "interactive"},
        },
        "spec": {
            "nodeName": "gpu-node-1",
            "containers": [
                {"name": "engine", "image": "engine", "resources": {"limits": {"nvidia.com/gpu": "4"}}}
            ],
        },
    }
    assert kubectl.apply(pod).returncode == 0
    kubelet = agents["gpu-node-1"].kubelet
    kubelet.allocate(namespace, "half", range(4, 8))
    assert kubectl.apply(budget_manifest(release_hold="10m")).returncode == 0
    try:
        obj = wait_for(
            lambda: (
                (o := node_powers(kubectl).get("gpu-node-1"))
                and [g.get("priority") for g in sorted(o["spec"].get("gpus", []), key=lambda g: g["index"])]
                == ["batch"] * 4 + ["interactive"] * 4
                and o
            ),
            timeout=60,
            what="priorities from the kubelet's allocation",
        )
        status = obj["status"]
        assert status["attribution"] == "Kubelet"
        pods = {g["uuid"]: g.get("pod", "") for g in status["gpus"]}
        assert pods == {uuid: (f"{namespace}/half" if i >= 4 else "") for i, uuid in enumerate(UUIDS)}
        assert all(g["uuid"] == UUIDS[g["index"]] for g in obj["spec"]["gpus"])
    finally:
        kubelet.release(namespace, "half")
        kubectl("delete", "powerbudget", BUDGET)
        wait_for(lambda: not node_powers(kubectl), timeout=30, what="NodePowers released")


def test_an_agent_without_nvml_turns_the_budget_not_ready_naming_its_node(
    kubectl: Kubectl, operator: LocalOperator, agents: dict[str, AgentProcess]
) -> None:
    """Fail closed: an agent told its NVML library is missing caps nothing, says so in its
    NodePower and metrics, and the budget is not Ready with that node named."""
    assert kubectl.apply(budget_manifest(release_hold="10m")).returncode == 0
    sick = agents["gpu-node-2"]
    try:
        wait_for(
            lambda: (condition(kubectl.get("powerbudget", BUDGET)) or {}).get("reason") == "Enforcing",
            what="budget enforcing",
        )
        sick.set_load(0.0, nvml_fault="LibraryNotFound")
        budget = wait_for(
            lambda: (
                (o := kubectl.get("powerbudget", BUDGET))
                and (condition(o) or {}).get("reason") == "NotEnforcing"
                and o
            ),
            timeout=30,
            what="budget not Ready: an agent cannot apply caps",
        )
        ready = condition(budget)
        assert ready is not None and ready["status"] == "False"
        assert "gpu-node-2 (NvmlLibraryNotFound" in ready["message"], ready["message"]
        assert "1 of 4 nodes" in ready["message"]
        assert budget["status"]["unenforcedNodes"] == ["gpu-node-2"]
        obj = node_powers(kubectl)["gpu-node-2"]
        assert obj["status"]["enforcing"] is False and obj["status"]["gpus"] == []
        enforcing = condition(obj, "Enforcing")
        assert enforcing is not None and enforcing["reason"] == "NvmlLibraryNotFound"
        assert "nvmlDeviceGetCount" in enforcing["message"]
        assert wait_for(lambda: operator_gauge(operator, "ampacity_powerbudget_unenforced_nodes") == 1)
        samples = sick.metrics()
        assert samples[("ampacity_node_enforcing", "")] == 0.0
        assert samples[("ampacity_node_agent_nvml_errors_total", "")] >= 1
        # NVML back: the budget recovers on its own.
        sick.set_load(0.0)
        wait_for(
            lambda: (condition(kubectl.get("powerbudget", BUDGET)) or {}).get("reason") == "Enforcing",
            timeout=60,
            what="budget enforcing again",
        )
    finally:
        sick.set_load(0.0)
        kubectl("delete", "powerbudget", BUDGET)
        wait_for(lambda: not node_powers(kubectl), timeout=30, what="NodePowers released")


def assert_writes_only_its_own_status(agent: Kubectl) -> None:
    """gpu-node-0's agent is refused another node's NodePower status and may patch its own."""
    status = json.dumps({"status": {"powerWatts": 1.0}})
    other = agent.run(
        "patch", "nodepower", "gpu-node-1", "--subresource=status", "--type=merge", "-p", status
    )
    assert other.returncode != 0
    assert "may write only the NodePower of its own node (gpu-node-0), not gpu-node-1" in other.stderr
    own = agent.run("patch", "nodepower", "gpu-node-0", "--subresource=status", "--type=merge", "-p", status)
    assert own.returncode == 0, own.stderr


def test_an_agent_cannot_write_another_nodes_nodepower(
    cluster: LocalCluster, kubectl: Kubectl, agent_policy: str, tmp_path: Path
) -> None:
    for node in ("gpu-node-0", "gpu-node-1"):
        kubectl.apply(
            {
                "apiVersion": "ampacity.dev/v1alpha1",
                "kind": "NodePower",
                "metadata": {"name": node},
                "spec": {},
            }
        )
    try:
        agent0 = Kubectl(agent_kubeconfig(cluster, "gpu-node-0", tmp_path))
        assert_writes_only_its_own_status(agent0)
        # Specs (the operator's assignment) are out of reach (RBAC).
        spec = agent0.run(
            "patch", "nodepower", "gpu-node-0", "--type=merge", "-p", json.dumps({"spec": {"budget": "x"}})
        )
        assert spec.returncode != 0 and "forbidden" in spec.stderr.lower()
        delete = agent0.run("delete", "nodepower", "gpu-node-1")
        assert delete.returncode != 0 and "forbidden" in delete.stderr.lower()
        assert (kubectl.get("nodepower", "gpu-node-1") or {}).get("status", {}).get("powerWatts") != 1.0
    finally:
        kubectl.run("delete", "nodepower", "gpu-node-0", "gpu-node-1", "--ignore-not-found")


def test_the_daemonset_service_account_is_confined_to_its_pods_node(
    cluster: LocalCluster, kubectl: Kubectl, agent_policy: str, tmp_path: Path
) -> None:
    """In a real cluster the agent runs as the DaemonSet's service account; its pod-bound token
    carries the pod's node name, which the admission policy compares with the object's name."""
    for node in ("gpu-node-0", "gpu-node-1"):
        kubectl.apply(
            {
                "apiVersion": "ampacity.dev/v1alpha1",
                "kind": "NodePower",
                "metadata": {"name": node},
                "spec": {},
            }
        )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent-on-node-0", "namespace": RELEASE_NAMESPACE},
        "spec": {
            "nodeName": "gpu-node-0",
            "serviceAccountName": AGENT_SA,
            "containers": [{"name": "agent", "image": "agent"}],
        },
    }
    try:
        wait_for(lambda: kubectl.apply(pod).returncode == 0, timeout=30, what="agent pod admitted")
        token = kubectl(
            "create",
            "token",
            AGENT_SA,
            "-n",
            RELEASE_NAMESPACE,
            "--bound-object-kind=Pod",
            "--bound-object-name=agent-on-node-0",
        ).strip()
        config = tmp_path / "sa.kubeconfig"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "local",
                            "cluster": {
                                "server": cluster.server,
                                "certificate-authority": str(cluster.pki.ca.cert),
                            },
                        }
                    ],
                    "users": [{"name": "agent", "user": {"token": token}}],
                    "contexts": [{"name": "agent", "context": {"cluster": "local", "user": "agent"}}],
                    "current-context": "agent",
                }
            )
        )
        assert_writes_only_its_own_status(Kubectl(config))
    finally:
        kubectl.run("delete", "pod", "agent-on-node-0", "-n", RELEASE_NAMESPACE, "--wait=false")
        kubectl.run("delete", "nodepower", "gpu-node-0", "gpu-node-1", "--ignore-not-found")
