"""The node agent's round against a fake API: enforce, report, fail safe, release."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import generate_latest

from agents.agent import Agent, LoadFile
from agents.gpu import SimulatedGpuBackend
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
    agent = Agent("n0", backend, kube, backend_name="simulated", clock=clock)  # type: ignore[arg-type]
    return agent, backend, kube, clock


async def test_enforces_a_fresh_assignment_and_reports_it() -> None:
    agent, backend, kube, clock = make()
    kube.assign({0: 400.0}, at=clock.now - 1)
    result = await agent.step()
    assert not result.failsafe
    assert result.limits == (400.0, 700.0)  # GPU 1 is not listed: uncapped
    status = kube.patches[-1]
    assert [g["limitWatts"] for g in status["gpus"]] == [400.0, 700.0]
    assert status["gpus"][0]["powerWatts"] == backend.power_watts(0) <= 400.0
    assert status["failsafe"] is False
    assert status["conditions"][0]["reason"] == "Enforcing"
    assert status["observedGeneration"] == 2
    text = generate_latest(agent.metrics.registry).decode()
    assert 'ampacity_gpu_power_limit_watts{gpu="0",node="n0"} 400.0' in text
    assert 'ampacity_gpu_cap_changes_total{gpu="0",node="n0"} 1.0' in text
    assert 'ampacity_node_failsafe{node="n0"} 0.0' in text


async def test_stale_assignment_falls_back_to_the_safe_cap_and_says_so() -> None:
    agent, _, kube, clock = make()
    kube.assign({0: 250.0, 1: 700.0}, at=clock.now - 30, safe=300.0)
    result = await agent.step()
    # Never loosen in fail-safe: GPU 0 keeps its tighter stale cap, GPU 1 drops to the safe cap.
    assert result.failsafe and result.limits == (250.0, 300.0)
    assert "30s old" in result.reason
    status = kube.patches[-1]
    assert status["failsafe"] is True and "30s old" in status["failsafeReason"]
    assert status["conditions"][0]["reason"] == "Failsafe"
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


async def test_load_file_drives_the_simulated_gpus(tmp_path: Path) -> None:
    backend = SimulatedGpuBackend(2, clock=lambda: 0.0)
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"prompt": 1.0, "gpus": {"1": {"prompt": 0.0}}}))
    LoadFile(path, backend).refresh()
    assert backend.power_watts(0) > 600 > 100 > backend.power_watts(1)
