"""The PowerBudget reconciler end to end against the fake API server: a NodePower per selected node,
owned by its Node; caps from the agents' telemetry; the status patch skipped when nothing changed;
failures in words."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from ampacity.api import POWER_BUDGET
from ampacity.api.gpu import GPU_RESOURCE, ROW_LABEL
from ampacity.kube import ApiUnavailable
from controllers.powerbudget import controller as pb
from tests.fakes import FakeKube, Operator

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "powerbudget.yaml"


def node(name: str, row: str) -> dict[str, Any]:
    return {
        "kind": "Node",
        "metadata": {"name": name, "labels": {ROW_LABEL: row}},
        "status": {"capacity": {GPU_RESOURCE: "2"}, "allocatable": {GPU_RESOURCE: "2"}},
    }


def telemetry(watts: float) -> dict[str, Any]:
    gpu = {
        "limitWatts": 700,
        "minLimitWatts": 200,
        "maxLimitWatts": 700,
        "powerWatts": watts,
        "energyJoules": 0,
    }
    return {
        "sampledAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "gpus": [{"index": i, **gpu} for i in range(2)],
    }


@pytest.fixture(autouse=True)
def fresh_runtime() -> Any:
    """The controller keeps its engines in module state (the power helper moves them to the memo)."""
    yield
    for rt in pb.RUNTIMES.values():
        rt.close()
    pb.RUNTIMES.clear()
    pb.NODE_POWERS.clear()
    pb.DELETED.clear()
    pb._PARSED.clear()
    pb._TRIGGERED.clear()


async def test_a_budget_assigns_its_nodes_and_settles(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube()
    for i in range(3):
        kube.add(node(f"a{i}", "row-a"))
    kube.add(node("b0", "row-b"))
    kube.add(yaml.safe_load(EXAMPLE.read_text()))
    monkeypatch.setattr(pb, "ensure_node_power_watch", lambda: None)  # rounds run from the timer here
    monkeypatch.setattr(kopf, "event", lambda *a, **k: None)
    async with Operator(kube) as op:
        first = await op.reconcile(POWER_BUDGET, pb.reconcile, None, "row-a")
        assert first.error is None
        for rt in pb.RUNTIMES.values():  # let the NodePower writers finish
            for task in list(rt.writers.values()):
                await task
        powers = kube.of_kind("NodePower")
        assert sorted(p["metadata"]["name"] for p in powers) == ["a0", "a1", "a2"]
        for p in powers:
            owner = p["metadata"]["ownerReferences"][0]
            assert owner["kind"] == "Node" and owner["name"] == p["metadata"]["name"]
        ready = op.condition("PowerBudget", None, "row-a")
        assert ready["reason"] == "AwaitingTelemetry" and ready["message"].startswith("3 nodes with 6 GPUs")

        # The agents report: every node at 650 W per GPU, 3.9 kW in all, far under 20 kW.
        for i in range(3):
            await kube.patch_status("NodePower", None, f"a{i}", telemetry(650))
        await op.reconcile(POWER_BUDGET, pb.reconcile, None, "row-a")
        ready = op.condition("PowerBudget", None, "row-a")
        assert (ready["status"], ready["reason"]) == ("True", "Enforcing")
        assert "power 3900 W of 20000 W" in ready["message"]

        kube.fail("list", ApiUnavailable(0, "GET nodes: could not connect to the API server"), kind="Node")
        failed = await op.reconcile(POWER_BUDGET, pb.reconcile, None, "row-a")
        assert isinstance(failed.error, kopf.TemporaryError)
        ready = op.condition("PowerBudget", None, "row-a")
        assert (ready["reason"], ready["message"]) == (
            "ApiUnavailable",
            "GET nodes: could not connect to the API server; retrying in 15 s",
        )
