"""PowerBudget controller helpers: spec to policy budget, pods to GPU priorities, reports to telemetry."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from ampacity.api.meta import ConditionStatus
from ampacity.api.nodepower import NodePowerStatus
from ampacity.api.powerbudget import PowerBudgetSpec
from controllers.powerbudget.controller import (
    PRIORITY_LABEL,
    gpu_priorities,
    guessed_nodes,
    node_priorities,
    policy_budget,
    telemetry_of,
)
from controllers.powerbudget.runtime import BudgetRuntime, PowerRuntime


def spec() -> PowerBudgetSpec:
    return PowerBudgetSpec.model_validate(
        {
            "nodeSelector": {"matchLabels": {"row": "a"}},
            "limitWatts": 20000,
            "safeCapWatts": 450,
            "telemetryStaleness": "5s",
            "releaseHold": "3s",
        }
    )


def pod(name: str, node: str, gpus: int, created: str, priority: str | None = None) -> dict[str, Any]:
    labels = {PRIORITY_LABEL: priority} if priority else {}
    return {
        "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
    }


def test_spec_maps_to_the_policy_budget() -> None:
    budget = policy_budget(spec())
    assert budget.limit_watts == 20000 and budget.safe_cap_watts == 450
    assert budget.staleness_seconds == 5 and budget.hold_seconds == 3
    assert budget.t1_watts == 17000 and budget.t2_watts == 19000
    assert {c.name: c.rank for c in budget.classes} == {"batch": 0, "interactive": 100}


def test_pods_give_their_gpus_a_priority_in_creation_order() -> None:
    pods = [
        pod("b", "n0", 2, "2026-01-01T00:00:02Z", "interactive"),
        pod("a", "n0", 4, "2026-01-01T00:00:01Z"),
        pod("elsewhere", "n9", 8, "2026-01-01T00:00:00Z", "interactive"),
        {"metadata": {"name": "cpu"}, "spec": {"nodeName": "n0", "containers": [{}]}},
    ]
    result = gpu_priorities(pods, {"n0", "n1"}, "batch")
    assert result == {
        "n0": {0: "batch", 1: "batch", 2: "batch", 3: "batch", 4: "interactive", 5: "interactive"},
        "n1": {},
    }


def test_a_report_becomes_telemetry_and_idle_gpus_get_no_class() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    status = NodePowerStatus.model_validate(
        {
            "sampledAt": at.isoformat(),
            "gpus": [
                {
                    "index": i,
                    "powerWatts": 500,
                    "energyJoules": 1,
                    "limitWatts": 700,
                    "minLimitWatts": 200,
                    "maxLimitWatts": 700,
                }
                for i in range(2)
            ],
        }
    )
    samples = telemetry_of("n0", status, {0: "interactive"})
    assert [(s.gpu.index, s.priority, s.timestamp) for s in samples] == [
        (0, "interactive", at.timestamp()),
        (1, "", at.timestamp()),
    ]
    assert policy_budget(spec()).priority_class("").name == "batch"
    assert telemetry_of("n0", NodePowerStatus(), {}) == []


async def test_the_client_retries_too_many_requests() -> None:
    """Right after a CRD is established the API server answers 429 for a moment; the first
    PowerBudget reconcile must not report that as a failure."""
    import httpx

    from ampacity.kube import Kube

    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            return httpx.Response(
                429, headers={"Retry-After": "0"}, json={"message": "storage is (re)initializing"}
            )
        return httpx.Response(200, json={"items": [{"metadata": {"name": "n0"}}]})

    kube = Kube(http=httpx.AsyncClient(base_url="https://api", transport=httpx.MockTransport(handler)))
    assert await kube.list_objects("NodePower", None) == [{"metadata": {"name": "n0"}}]
    assert calls == ["/apis/ampacity.dev/v1alpha1/nodepowers"] * 2
    await kube.close()


def reading(index: int, uuid: str, pod: str = "", watts: float = 500) -> dict[str, Any]:
    return {
        "index": index,
        "uuid": uuid,
        "pod": pod,
        "powerWatts": watts,
        "limitWatts": 700,
        "minLimitWatts": 200,
        "maxLimitWatts": 700,
    }


def report(gpus: list[dict[str, Any]], attribution: str = "Kubelet", **extra: Any) -> NodePowerStatus:
    return NodePowerStatus.model_validate(
        {
            "sampledAt": datetime.now(UTC).isoformat(),
            "gpus": gpus,
            "attribution": attribution,
            "enforcing": True,
            **extra,
        }
    )


def test_priorities_follow_the_kubelets_gpu_to_pod_map() -> None:
    pods = [
        pod("chat", "n0", 1, "2026-01-01T00:00:02Z", "interactive"),
        pod("train", "n0", 1, "2026-01-01T00:00:01Z"),
    ]
    # The kubelet gave chat GPU 1 and train GPU 0; creation order would have said the opposite.
    statuses = {
        "n0": report([reading(0, "GPU-a", "ns/train"), reading(1, "GPU-b", "ns/chat"), reading(2, "GPU-c")]),
        "n1": report([reading(0, "GPU-d")], attribution="Unavailable"),
    }
    result = node_priorities(statuses, pods, {"n0", "n1"}, "batch")
    assert result["n0"] == {0: "batch", 1: "interactive"}  # GPU 2 has no pod: idle, lowest class
    assert result["n1"] == {}  # no pods on n1: the guess is empty too
    assert guessed_nodes(statuses, {"n0", "n1"}) == ["n1"]


def runtime_with(statuses: dict[str, NodePowerStatus]) -> tuple[PowerRuntime, BudgetRuntime]:
    power = PowerRuntime(kube=None)  # type: ignore[arg-type]  # rounds write through writers only
    rt = power.budget("row", "uid-1", spec(), policy_budget(spec()))
    assert rt is not None
    rt.nodes = {node: f"uid-{node}" for node in statuses}
    for node, status in statuses.items():
        power.node_powers[node] = {
            "metadata": {"name": node, "resourceVersion": "1"},
            "status": status.to_api(),
        }
    return power, rt


async def test_a_round_names_the_nodes_whose_agent_cannot_apply_caps() -> None:
    failing = report([], enforcing=False)
    failing.set_condition(
        "Enforcing", ConditionStatus.FALSE, "NvmlLibraryNotFound", "caps are not applied", 1
    )
    power, rt = runtime_with({"n0": report([reading(0, "GPU-a")]), "n1": failing})
    power._round(rt)
    assert rt.reporting == 2
    assert rt.unenforced == {"n1": "NvmlLibraryNotFound: caps are not applied"}
    assert set(rt.pending) == {"n0", "n1"}  # assignments queued for both (writers never ran)
    for task in rt.writers.values():
        task.cancel()


async def test_a_gpu_that_disappears_is_dropped_with_an_event(caplog: pytest.LogCaptureFixture) -> None:
    power, rt = runtime_with({"n0": report([reading(0, "GPU-a"), reading(1, "GPU-b")])})
    power._round(rt)
    assert rt.result is not None and len(rt.result.assignments) == 2
    power.node_powers["n0"]["status"] = report([reading(0, "GPU-a")]).to_api()
    power._parsed.clear()
    power._round(rt)
    assert [a.gpu.index for a in rt.result.assignments] == [0]
    assert "GpuRemoved: GPU GPU-b (index 1) is gone from node n0" in caplog.text
    # An agent whose NVML fails reports no GPUs: unreadable, not gone, so no more events.
    caplog.clear()
    power.node_powers["n0"]["status"] = report([], enforcing=False).to_api()
    power._parsed.clear()
    power._round(rt)
    assert "GpuRemoved" not in caplog.text
    for task in rt.writers.values():
        task.cancel()


async def test_a_deleted_budget_is_not_resurrected_and_its_memory_is_bounded() -> None:
    power = PowerRuntime(kube=None)  # type: ignore[arg-type]
    assert power.budget("row", "uid-1", spec(), policy_budget(spec())) is not None
    power.deleted("row", "uid-1")
    assert "row" not in power.budgets
    assert power.budget("row", "uid-1", spec(), policy_budget(spec())) is None
    assert power.budget("row", "uid-2", spec(), policy_budget(spec())) is not None  # recreated
