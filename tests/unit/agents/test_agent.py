"""The node agent's round against a fake API: enforce, report, fail safe, release."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import generate_latest

from agents.agent import Agent, LoadFile
from agents.gpu import GpuError, SimulatedFaults, SimulatedGpuBackend
from agents.pod_resources import PodRef, PodResourcesError
from ampacity.kube import KubeError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeKube:
    """Holds one NodePower; `down` makes every request fail like an unreachable API server."""

    def __init__(self) -> None:
        self.obj: dict[str, Any] | None = None
        self.down = False
        self.patches: list[dict[str, Any]] = []

    def assign(self, caps: dict[int, float], at: float, safe: float = 300.0) -> None:
        self.obj = {
            "metadata": {"name": "n0", "generation": 2},
            "spec": {
                "budget": "row",
                "gpus": [{"index": i, "capWatts": c, "capped": c < 700} for i, c in caps.items()],
                "assignedAt": datetime.fromtimestamp(at, UTC).isoformat(),
                "safeCapWatts": safe,
                "staleness": "10s",
            },
        }

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        if self.down:
            raise httpx.ConnectError("refused")
        return self.obj

    async def patch_status(self, kind: str, namespace: str | None, name: str, status: Any) -> Any:
        if self.down:
            raise KubeError(503, "unavailable")
        self.patches.append(status)
        return {}


def make(gpus: int = 2) -> tuple[Agent, SimulatedGpuBackend, FakeKube, Clock]:
    clock = Clock()
    backend = SimulatedGpuBackend(gpus, clock=lambda: 0.0)
    for i in range(gpus):
        backend.set_load(i, prompt_busy=1.0)
    kube = FakeKube()
    agent = Agent("n0", backend, kube, clock=clock)  # type: ignore[arg-type]
    return agent, backend, kube, clock


def power(backend: SimulatedGpuBackend, index: int) -> float:
    return backend.read(backend.uuid(index)).power_watts


async def test_enforces_a_fresh_assignment_and_reports_it() -> None:
    agent, backend, kube, clock = make()
    kube.assign({0: 400.0}, at=clock.now - 1)
    result = await agent.step()
    assert not result.failsafe and result.enforcing
    assert result.limits == (400.0, 700.0)  # GPU 1 is not listed: uncapped
    status = kube.patches[-1]
    assert [g["limitWatts"] for g in status["gpus"]] == [400.0, 700.0]
    assert [g["uuid"] for g in status["gpus"]] == [backend.uuid(0), backend.uuid(1)]
    assert status["gpus"][0]["powerWatts"] == power(backend, 0) <= 400.0
    assert status["failsafe"] is False and status["enforcing"] is True
    reasons = {c["type"]: c["reason"] for c in status["conditions"]}
    assert reasons == {"Ready": "Enforcing", "Enforcing": "Applied"}
    assert status["observedGeneration"] == 2
    text = generate_latest(agent.metrics.registry).decode()
    labels = f'UUID="{backend.uuid(0)}",gpu="0",modelName="h100-sxm",node="n0"'
    assert f"ampacity_gpu_power_limit_watts{{{labels}}} 400.0" in text
    assert f"ampacity_gpu_cap_changes_total{{{labels}}} 1.0" in text
    assert 'ampacity_node_failsafe{node="n0"} 0.0' in text
    assert 'ampacity_node_enforcing{node="n0"} 1.0' in text


async def test_stale_assignment_falls_back_to_the_safe_cap_and_says_so() -> None:
    agent, _, kube, clock = make()
    kube.assign({0: 250.0, 1: 700.0}, at=clock.now - 30, safe=300.0)
    result = await agent.step()
    # Never loosen in fail-safe: GPU 0 keeps its tighter stale cap, GPU 1 drops to the safe cap.
    assert result.failsafe and result.limits == (250.0, 300.0)
    assert "30s old" in result.reason
    status = kube.patches[-1]
    assert status["failsafe"] is True and "30s old" in status["failsafeReason"]
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Ready"] == "Failsafe"
    assert 'ampacity_node_failsafe{node="n0"} 1.0' in generate_latest(agent.metrics.registry).decode()


async def test_unreachable_api_keeps_the_last_spec_and_fails_safe() -> None:
    agent, _, kube, clock = make()
    kube.assign({}, at=clock.now)
    assert (await agent.step()).limits == (700.0, 700.0)
    kube.down = True
    result = await agent.step()
    assert result.failsafe and not result.api_reachable
    assert result.limits == (300.0, 300.0)
    assert result.reason == "API server unreachable"
    kube.down = False
    kube.assign({}, at=clock.now)
    result = await agent.step()
    assert not result.failsafe and result.limits == (700.0, 700.0)
    assert agent.metrics.failsafe_entries == 1


async def test_node_without_nodepower_is_left_alone_then_released() -> None:
    agent, _, kube, clock = make()
    result = await agent.step()
    assert not result.under_budget and result.limits == (700.0, 700.0) and not kube.patches
    kube.assign({0: 350.0, 1: 350.0}, at=clock.now)
    assert (await agent.step()).limits == (350.0, 350.0)
    kube.obj = None  # the budget was deleted
    assert (await agent.step()).limits == (700.0, 700.0)


async def test_nvml_missing_at_start_is_reported_and_caps_nothing() -> None:
    kube, clock = FakeKube(), Clock()
    opened: list[int] = []

    def open_nvml() -> SimulatedGpuBackend:
        opened.append(1)
        raise GpuError("LibraryNotFound", "nvmlInit", "NVML Shared Library Not Found")

    agent = Agent("n0", None, kube, clock=clock, open_backend=open_nvml)  # type: ignore[arg-type]
    kube.assign({0: 300.0}, at=clock.now)
    result = await agent.step()
    assert not result.enforcing and result.limits == ()
    status = kube.patches[-1]
    assert status["enforcing"] is False and status["gpus"] == []
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Enforcing"]["status"] == "False"
    assert conditions["Enforcing"]["reason"] == "NvmlLibraryNotFound"
    assert "nvmlInit" in conditions["Enforcing"]["message"]
    assert conditions["Ready"]["reason"] == "NotEnforcing"
    text = generate_latest(agent.metrics.registry).decode()
    assert 'ampacity_node_enforcing{node="n0"} 0.0' in text
    assert 'ampacity_node_agent_nvml_errors_total{node="n0",reason="NvmlLibraryNotFound"} 1.0' in text
    await agent.step()  # the next round does not hammer the driver: retried every REOPEN_SECONDS
    assert len(opened) == 1


async def test_a_refused_limit_is_reported_with_the_limit_the_gpu_really_has() -> None:
    agent, backend, kube, clock = make()
    backend.faults = SimulatedFaults(set_limit="NoPermission")
    kube.assign({0: 300.0, 1: 300.0}, at=clock.now)
    result = await agent.step()
    assert not result.enforcing
    assert result.limits == (700.0, 700.0)  # nothing claims a cap it did not apply
    status = kube.patches[-1]
    assert [g["limitWatts"] for g in status["gpus"]] == [700.0, 700.0]
    assert status["enforcing"] is False and len(status["faults"]) == 2
    assert "NVML NoPermission" in status["faults"][0]
    enforcing = next(c for c in status["conditions"] if c["type"] == "Enforcing")
    assert enforcing["reason"] == "NvmlNoPermission" and "and 1 more" in enforcing["message"]


async def test_nvml_failing_mid_run_is_reported_in_the_next_round_and_recovers() -> None:
    agent, backend, kube, clock = make()
    kube.assign({0: 300.0}, at=clock.now)
    assert (await agent.step()).enforcing
    backend.faults = SimulatedFaults(library="DriverNotLoaded")
    clock.now += 1
    result = await agent.step()
    assert not result.enforcing and result.reported
    assert kube.patches[-1]["enforcing"] is False
    backend.faults = SimulatedFaults()
    clock.now += 1
    result = await agent.step()
    assert result.enforcing and result.reported and result.limits == (300.0, 700.0)


async def test_release_gives_back_the_limit_found_at_start() -> None:
    agent, backend, kube, clock = make()
    backend.set_power_limit(backend.uuid(0), 600.0)  # an administrator's limit before the agent
    kube.assign({0: 300.0, 1: 300.0}, at=clock.now)
    await agent.step()
    kube.obj = None
    assert (await agent.step()).limits == (600.0, 700.0)


async def test_clock_lock_is_applied_and_released_with_the_assignment() -> None:
    agent, backend, kube, clock = make()
    kube.assign({0: 700.0}, at=clock.now)
    assert kube.obj is not None
    kube.obj["spec"]["gpus"][0]["clockFraction"] = 0.6
    await agent.step()
    status = kube.patches[-1]
    assert (
        status["gpus"][0]["lockedClockMhz"] == 1188 and status["gpus"][0]["clockMhz"] == 1188
    )  # ceil(0.6 x 1980)
    assert "lockedClockMhz" not in status["gpus"][1] or status["gpus"][1]["lockedClockMhz"] is None
    assert power(backend, 0) < 700
    # In fail-safe the watt cap governs and the lock comes off.
    clock.now += 60
    await agent.step()
    assert backend.read(backend.uuid(0)).clock_mhz == backend.spec.max_clock_mhz


async def test_steady_power_is_written_only_on_the_heartbeat() -> None:
    agent, backend, kube, clock = make()
    kube.assign({}, at=clock.now)
    assert (await agent.step()).reported
    for _ in range(4):  # staleness 10 s: heartbeat every 5 s
        clock.now += 1
        kube.assign({}, at=clock.now)
        assert not (await agent.step()).reported
    clock.now += 1
    kube.assign({}, at=clock.now)
    assert (await agent.step()).reported
    assert len(kube.patches) == 2
    # A load step beyond the deadband is written at once.
    backend.set_load(0, prompt_busy=0.0)
    clock.now += 0.5
    assert (await agent.step()).reported
    # So is a cap taking effect, whatever the power did.
    kube.assign({1: 690.0}, at=clock.now)
    clock.now += 0.5
    assert (await agent.step()).reported
    assert agent.metrics.status_writes == len(kube.patches) == 4


async def test_a_gpu_that_disappears_is_dropped() -> None:
    agent, backend, kube, clock = make()
    kube.assign({0: 300.0, 1: 300.0}, at=clock.now)
    await agent.step()
    lost = backend.uuid(1)
    backend.remove(1)
    clock.now += 1
    result = await agent.step()
    assert result.enforcing and result.reported and result.limits == (300.0,)
    assert [g["uuid"] for g in kube.patches[-1]["gpus"]] == [backend.uuid(0)]
    assert lost not in str(kube.patches[-1]) and agent.metrics.gpus_lost == 1


class FakePods:
    def __init__(self, pods: dict[str, PodRef] | None) -> None:
        self.pods = pods

    async def gpu_pods(self) -> dict[str, PodRef]:
        if self.pods is None:
            raise PodResourcesError("kubelet.sock: UNAVAILABLE")
        return self.pods


async def test_each_gpu_reports_the_pod_the_kubelet_gave_it() -> None:
    agent, backend, kube, clock = make()
    pods = FakePods({backend.uuid(1): PodRef("team", "chat-0")})
    agent.pod_resources = pods  # type: ignore[assignment]
    kube.assign({}, at=clock.now)
    await agent.step()
    status = kube.patches[-1]
    assert [g.get("pod", "") for g in status["gpus"]] == ["", "team/chat-0"]
    assert status["attribution"] == "Kubelet"
    pods.pods = None
    clock.now += 1
    assert (await agent.step()).reported
    assert kube.patches[-1]["attribution"] == "Unavailable"
    assert all(not g.get("pod") for g in kube.patches[-1]["gpus"])


async def test_load_file_drives_the_simulated_gpus_and_their_faults(tmp_path: Path) -> None:
    backend = SimulatedGpuBackend(2, clock=lambda: 0.0)
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"prompt": 1.0, "gpus": {"1": {"prompt": 0.0}}, "nvml": "LibraryNotFound"}))
    LoadFile(path, backend).refresh()
    assert backend.faults.library == "LibraryNotFound"
    backend.faults = SimulatedFaults()
    assert power(backend, 0) > 600 > 100 > power(backend, 1)
