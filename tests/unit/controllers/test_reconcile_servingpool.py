"""The ServingPool reconciler end to end against the fake API server: a plan, engine Deployments and
Services owned by the pool, readiness followed, the status patch skipped when nothing changed,
failures in words, and Nodes read from the shared cache."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ampacity.api import SERVING_POOL
from ampacity.api.gpu import GPU_RESOURCE, GPU_TYPE_LABEL
from ampacity.kube import Invalid
from controllers.servingpool.controller import reconcile
from tests.fakes import FakeKube, Operator

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "servingpool.yaml"


def h100_node(name: str) -> dict[str, Any]:
    return {
        "kind": "Node",
        "metadata": {"name": name, "labels": {GPU_TYPE_LABEL: "h100"}},
        "status": {"allocatable": {GPU_RESOURCE: "8"}},
    }


async def test_a_pool_is_planned_run_and_settles() -> None:
    kube = FakeKube()
    for i in range(2):
        kube.add(h100_node(f"h100-{i}"))
    pool = yaml.safe_load(EXAMPLE.read_text())
    pool["metadata"]["namespace"] = "ns"
    kube.add(pool)
    name = pool["metadata"]["name"]
    async with Operator(kube) as op:
        first = await op.reconcile(SERVING_POOL, reconcile, "ns", name)
        assert first.error is None
        assert any(reason == "Planned" for _, reason, _ in first.events)
        # The engines (the pool's router is a Deployment too, without GPUs).
        deployments = [
            d
            for d in kube.of_kind("Deployment")
            if d["metadata"]["labels"]["app.kubernetes.io/component"] != "router"
        ]
        services = kube.of_kind("Service")
        assert deployments and services
        uid = kube.stored("ServingPool", "ns", name)["metadata"]["uid"]  # type: ignore[index]
        for child in kube.of_kind("Deployment") + services:
            assert child["metadata"]["ownerReferences"][0]["uid"] == uid
            assert child["metadata"]["labels"]["ampacity.dev/servingpool"] == name
        desired = sum(d["spec"]["replicas"] for d in deployments)
        ready = op.condition("ServingPool", "ns", name)
        assert (ready["reason"], ready["message"]) == (
            "EnginesStarting",
            f"0/{desired} engine instances ready",
        )

        # The engines and the router come up (the Deployment controller's part).
        for d in kube.of_kind("Deployment"):
            replicas = d["spec"]["replicas"]
            await kube.patch_status("Deployment", "ns", d["metadata"]["name"], {"readyReplicas": replicas})
        await op.reconcile(SERVING_POOL, reconcile, "ns", name)
        ready = op.condition("ServingPool", "ns", name)
        assert (ready["status"], ready["reason"]) == ("True", "EnginesReady")

        applies = kube.count("apply")
        quiet = await op.reconcile(SERVING_POOL, reconcile, "ns", name)
        assert quiet.error is None and quiet.patch is None and quiet.events == []
        assert kube.count("apply") == applies  # the children are as last applied: not written again
        assert kube.count("list", "Deployment") == kube.count("list", "Service") == 1  # pruned from the cache

        # Someone edits a child: the next pass puts it back.
        engine = deployments[0]["metadata"]["name"]
        await kube.patch("Deployment", "ns", engine, {"spec": {"replicas": 99}})
        await op.reconcile(SERVING_POOL, reconcile, "ns", name)
        assert (
            kube.stored("Deployment", "ns", engine)["spec"]["replicas"] == deployments[0]["spec"]["replicas"]
        )  # type: ignore[index]
        assert kube.count("list", "Node") == 1  # three passes, one list: the rest came from the cache

        # A child the API server rejects is a condition that says so.
        await kube.patch("Deployment", "ns", engine, {"spec": {"replicas": 98}})
        kube.fail("apply", Invalid(422, f"PATCH deployments ns/{name}-engine: spec.replicas: Invalid value"))
        failed = await op.reconcile(SERVING_POOL, reconcile, "ns", name)
        assert failed.error is not None
        ready = op.condition("ServingPool", "ns", name)
        assert ready["reason"] == "ChildRejected" and "spec.replicas: Invalid value" in ready["message"]
        assert ready["message"].endswith("retrying in 15 s")


async def test_pools_created_together_are_planned_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Identical pools created at once: plans in parallel threads would only fight over the GIL and
    each plan from scratch; with the operator's planning lock they run one after another."""
    from controllers.servingpool import controller

    running, most = 0, 0
    plan = controller.plan_pool

    def counting(*args: Any) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            time.sleep(0.05)
            return plan(*args)
        finally:
            running -= 1

    monkeypatch.setattr(controller, "plan_pool", counting)
    kube = FakeKube()
    kube.add(h100_node("h100-0"))
    names = []
    for i in range(3):
        pool = yaml.safe_load(EXAMPLE.read_text())
        pool["metadata"] |= {"namespace": "ns", "name": f"pool-{i}"}
        kube.add(pool)
        names.append(pool["metadata"]["name"])
    async with Operator(kube) as op:
        op.memo[controller.PLANNING_LOCK_MEMO] = asyncio.Lock()
        passes = await asyncio.gather(*(op.reconcile(SERVING_POOL, reconcile, "ns", n) for n in names))
        assert all(p.error is None for p in passes)
        assert most == 1
