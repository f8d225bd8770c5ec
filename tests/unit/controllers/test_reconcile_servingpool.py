"""The ServingPool reconciler end to end against the fake API server: a plan, engine Deployments and
Services owned by the pool, readiness followed, the status patch skipped when nothing changed,
failures in words, and Nodes read from the shared cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
        deployments = kube.of_kind("Deployment")
        services = kube.of_kind("Service")
        assert deployments and services
        uid = kube.stored("ServingPool", "ns", name)["metadata"]["uid"]  # type: ignore[index]
        for child in deployments + services:
            assert child["metadata"]["ownerReferences"][0]["uid"] == uid
            assert child["metadata"]["labels"]["ampacity.dev/servingpool"] == name
        desired = sum(d["spec"]["replicas"] for d in deployments)
        ready = op.condition("ServingPool", "ns", name)
        assert (ready["reason"], ready["message"]) == (
            "EnginesStarting",
            f"0/{desired} engine instances ready",
        )

        # The engines come up (the Deployment controller's part).
        for d in deployments:
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
