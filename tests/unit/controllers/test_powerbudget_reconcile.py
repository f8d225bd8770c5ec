"""The PowerBudget reconciler against the in-memory client and the operator's real read cache.

Gather (cache) -> decide (policy) -> act (NodePower writes, status): a budget creates its
nodes' NodePowers; a node whose agent reports it cannot apply caps turns the budget not
Ready with the node named; a fresh report triggers a round without any reconcile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import kopf
import pytest

from ampacity.api import POWER_BUDGET
from ampacity.api.meta import ConditionStatus
from ampacity.api.nodepower import NodePowerStatus
from controllers.cache import ClusterCache
from controllers.powerbudget.controller import POWER_MEMO, reconcile
from controllers.powerbudget.runtime import PowerRuntime
from controllers.reconciler import CACHE_MEMO, Context, _reconcile_once
from tests.fakes import FakeKube

NODES = ("n0", "n1")


def gpu(index: int, watts: float) -> dict[str, Any]:
    return {
        "index": index,
        "uuid": f"GPU-{index}",
        "powerWatts": watts,
        "limitWatts": 700,
        "minLimitWatts": 200,
        "maxLimitWatts": 700,
    }


def add_budget(kube: FakeKube, **spec: str) -> None:
    """The row's PowerBudget (2,400 W over the nodes labelled row=a), with `spec` fields added."""
    kube.add(
        {
            "apiVersion": "ampacity.dev/v1alpha1",
            "kind": "PowerBudget",
            "metadata": {"name": "row"},
            "spec": {
                "nodeSelector": {"matchLabels": {"ampacity.dev/row": "a"}},
                "limitWatts": 2400,
                "safeCapWatts": 300,
                **spec,
            },
        }
    )


def report(enforcing: bool, watts: float = 300.0) -> dict[str, Any]:
    status = NodePowerStatus.model_validate(
        {
            "sampledAt": datetime.now(UTC).isoformat(),
            "gpus": [gpu(0, watts), gpu(1, watts)],
            "enforcing": enforcing,
            "backend": "nvml",
        }
    )
    if not enforcing:
        status.set_condition(
            "Enforcing",
            ConditionStatus.FALSE,
            "NvmlNoPermission",
            "caps are not applied: nvmlDeviceSetPowerManagementLimit: NVML NoPermission",
            1,
        )
    return status.to_api()


@pytest.fixture
async def operator() -> AsyncIterator[tuple[FakeKube, dict[str, Any]]]:
    kube = FakeKube()
    for name in NODES:
        kube.add(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": {"ampacity.dev/row": "a"}},
                "status": {"capacity": {"nvidia.com/gpu": "2"}},
            }
        )
    cache = ClusterCache(kube)
    await cache.start(sync_seconds=5)
    power = PowerRuntime(kube, cache.node_power_informer)
    try:
        yield kube, {CACHE_MEMO: cache, POWER_MEMO: power}
    finally:
        await power.close()
        await cache.close()


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def run(kube: FakeKube, memo: dict[str, Any]) -> Context:
    body = kopf.Body(kube.stored("PowerBudget", None, "row") or {})
    return await _reconcile_once(POWER_BUDGET, reconcile, body, kube, logging.getLogger("test"), memo)


async def test_a_node_that_cannot_apply_caps_turns_the_budget_not_ready(
    operator: tuple[FakeKube, dict[str, Any]],
) -> None:
    kube, memo = operator
    add_budget(kube)
    ctx = await run(kube, memo)
    assert ctx.status.condition("Ready").reason == "AwaitingTelemetry"
    await until(lambda: len(kube.of_kind("NodePower")) == 2, "NodePowers written")
    assert {o["spec"]["budget"] for o in kube.of_kind("NodePower")} == {"row"}

    await kube.patch_status("NodePower", None, "n0", report(enforcing=True))
    await kube.patch_status("NodePower", None, "n1", report(enforcing=False))
    cache: ClusterCache = memo[CACHE_MEMO]
    await until(
        lambda: all(
            (o.get("status") or {}).get("sampledAt") for o in cache.node_power_informer.objects.values()
        ),
        "reports in the cache",
    )
    ctx = await run(kube, memo)
    ready = ctx.status.condition("Ready")
    assert (ready.status, ready.reason) == (ConditionStatus.FALSE, "NotEnforcing")
    assert "1 of 2 nodes: n1 (NvmlNoPermission: caps are not applied" in ready.message
    assert ctx.status.unenforced_nodes == ["n1"]
    assert ctx.status.reporting_nodes == 2 and ctx.status.current_watts == 1200

    # n1's agent can enforce again: the next reconcile says so.
    await kube.patch_status("NodePower", None, "n1", report(enforcing=True))
    await until(
        lambda: (cache.node_power_informer.objects[("", "n1")].get("status") or {}).get("enforcing") is True,
        "recovered report in the cache",
    )
    ctx = await run(kube, memo)
    assert ctx.status.condition("Ready").reason == "Enforcing" and ctx.status.unenforced_nodes == []


async def test_a_surge_report_is_capped_without_a_reconcile(
    operator: tuple[FakeKube, dict[str, Any]],
) -> None:
    kube, memo = operator
    add_budget(kube, actuator="ClockLock")
    await run(kube, memo)
    await until(lambda: len(kube.of_kind("NodePower")) == 2, "NodePowers written")
    for node in NODES:
        await kube.patch_status("NodePower", None, node, report(enforcing=True, watts=700.0))

    def capped() -> bool:
        return all(any(g.get("capped") for g in o["spec"].get("gpus", [])) for o in kube.of_kind("NodePower"))

    await until(capped, "caps assigned from the reports alone")
    for obj in kube.of_kind("NodePower"):
        for g in obj["spec"]["gpus"]:
            assert g["uuid"] == f"GPU-{g['index']}"
            if g["capped"]:  # ClockLock: the agent locks the clock too
                assert 0 < g["clockFraction"] < 1
            else:
                assert "clockFraction" not in g


async def test_assignments_are_refreshed_on_time_without_reconciles_or_reports(
    operator: tuple[FakeKube, dict[str, Any]],
) -> None:
    kube, memo = operator
    add_budget(kube, telemetryStaleness="1s")
    await run(kube, memo)
    for node in NODES:
        await kube.patch_status("NodePower", None, node, report(enforcing=True))
    await until(lambda: all(o["spec"].get("gpus") for o in kube.of_kind("NodePower")), "first assignments")
    first = {o["metadata"]["name"]: o["spec"]["assignedAt"] for o in kube.of_kind("NodePower")}
    # No reconcile and no report from here on: the runtime's heartbeat alone refreshes assignedAt
    # (every half the staleness) so that the agents do not fall back to their safe cap.
    await until(
        lambda: all(
            o["spec"]["assignedAt"] != first[o["metadata"]["name"]] for o in kube.of_kind("NodePower")
        ),
        "assignedAt refreshed",
    )


async def test_nodes_without_a_reporting_agent_are_not_rewritten_at_idle(
    operator: tuple[FakeKube, dict[str, Any]],
) -> None:
    """A budget over nodes whose agents never reported writes their NodePowers once; its rounds
    (the reconcile timer's) and heartbeats rewrite nothing: a settled budget costs no writes."""
    kube, memo = operator
    add_budget(kube, telemetryStaleness="1s")
    await run(kube, memo)
    await until(lambda: len(kube.of_kind("NodePower")) == 2, "NodePowers written")
    writes = kube.count("apply", "NodePower") + kube.count("patch", "NodePower")
    for _ in range(4):  # 1.2 s: past three of the 1/3 s heartbeats
        await asyncio.sleep(0.3)
        await run(kube, memo)
    assert kube.count("apply", "NodePower") + kube.count("patch", "NodePower") == writes
