"""The ServingPool reconciler end to end against the fake API server: a plan, engine Deployments and
Services owned by the pool, readiness followed, the status patch skipped when nothing changed,
failures in words, and Nodes read from the shared cache."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ampacity.api import SERVING_POOL
from ampacity.api.gpu import GPU_RESOURCE, GPU_TYPE_LABEL
from ampacity.kube import ApiUnavailable, Invalid
from ampacity.serving import pool_plan
from controllers.servingpool.controller import reconcile
from tests.fakes import FakeKube, Operator

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "servingpool.yaml"


def h100_node(name: str) -> dict[str, Any]:
    return {
        "kind": "Node",
        "metadata": {"name": name, "labels": {GPU_TYPE_LABEL: "h100"}},
        "status": {"allocatable": {GPU_RESOURCE: "8"}},
    }


def h100_cluster(nodes: int) -> FakeKube:
    kube = FakeKube()
    for i in range(nodes):
        kube.add(h100_node(f"h100-{i}"))
    return kube


def example_pool(**spec: Any) -> dict[str, Any]:
    """examples/servingpool.yaml in namespace ns, with `spec` fields replaced."""
    pool = yaml.safe_load(EXAMPLE.read_text())
    pool["metadata"]["namespace"] = "ns"
    pool["spec"] |= spec
    return dict(pool)


async def test_a_settled_pool_reads_no_rbac_until_the_recheck_is_due(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's RBAC is not watched: the first pass applies it without reading it, later passes
    read it back only when the desired object changed or the recheck is due, and then repair what
    someone else changed."""
    from controllers.servingpool import controller

    kube = h100_cluster(2)
    pool = example_pool()
    kube.add(pool)
    name = pool["metadata"]["name"]
    rbac = ("ServiceAccount", "Role", "RoleBinding")
    async with Operator(kube) as op:
        assert (await op.reconcile(SERVING_POOL, reconcile, "ns", name)).error is None
        assert sum(kube.count("apply", kind) for kind in rbac) == 3
        reads = sum(kube.count("get", kind) for kind in rbac)
        assert reads == 0
        for _ in range(2):
            assert (await op.reconcile(SERVING_POOL, reconcile, "ns", name)).error is None
        assert sum(kube.count("get", kind) for kind in rbac) == reads
        role = kube.of_kind("Role")[0]
        await kube.delete("Role", "ns", role["metadata"]["name"])
        monkeypatch.setattr(controller, "RBAC_RECHECK_SECONDS", 0.0)
        assert (await op.reconcile(SERVING_POOL, reconcile, "ns", name)).error is None
        assert sum(kube.count("get", kind) for kind in rbac) > reads
        assert kube.stored("Role", "ns", role["metadata"]["name"]) is not None


async def test_a_pool_is_planned_run_and_settles() -> None:
    kube = h100_cluster(2)
    pool = example_pool()
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
        applies = kube.count("apply", "Deployment")
        for d in kube.of_kind("Deployment"):
            replicas = d["spec"]["replicas"]
            await kube.patch_status("Deployment", "ns", d["metadata"]["name"], {"readyReplicas": replicas})
        await op.reconcile(SERVING_POOL, reconcile, "ns", name)
        ready = op.condition("ServingPool", "ns", name)
        assert (ready["status"], ready["reason"]) == ("True", "EnginesReady")
        # Their status moved, not their spec: nothing to apply again.
        assert kube.count("apply", "Deployment") == applies

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


async def test_a_pass_that_fails_after_a_spec_change_does_not_keep_the_old_plan() -> None:
    """The failed pass records the generation it saw (its Ready condition explains the failure); the
    retry must still plan the new spec, not take the old plan as this generation's."""
    kube = h100_cluster(1)
    pool = example_pool()
    kube.add(pool)
    name = pool["metadata"]["name"]
    async with Operator(kube) as op:
        assert (await op.reconcile(SERVING_POOL, reconcile, "ns", name)).error is None
        assert op.condition("ServingPool", "ns", name, "Planned")["reason"] == "Planned"
        await kube.patch("ServingPool", "ns", name, {"spec": {"model": {"name": "no-such-model"}}})
        kube.fail(
            "apply",
            ApiUnavailable(503, "PATCH deployments: the server is currently unable to handle the request"),
        )
        failed = await op.reconcile(SERVING_POOL, reconcile, "ns", name)
        assert failed.error is not None
        assert op.condition("ServingPool", "ns", name)["reason"] == "ApiUnavailable"
        retried = await op.reconcile(SERVING_POOL, reconcile, "ns", name, retry=1)
        assert retried.error is None
        planned = op.condition("ServingPool", "ns", name, "Planned")
        assert planned["reason"] == "NoLatencyModel" and "no-such-model" in planned["message"]


async def test_an_edited_latency_profile_re_plans_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """ConfigMaps are not watched: a pool planned on a profile reads it on each pass (and asks for
    a pass every minute), and plans again only when the text changed."""
    from controllers.servingpool import controller

    seen: list[str | None] = []

    def fitting(spec: Any, profile: str | None) -> Any:
        # The planner's own profile fitting is tested in tests/unit/serving; here only which text
        # each plan was made from matters.
        seen.append(profile)
        sized = pool_plan.plan_pool(spec.model_copy(update={"latency_profile": None}))
        digest = pool_plan.profile_digest(profile)
        return dataclasses.replace(
            sized, plan=sized.plan.model_copy(update={"latency_profile_digest": digest})
        )

    monkeypatch.setattr(controller, "plan_pool", fitting)
    kube = h100_cluster(1)
    profile = {"kind": "ConfigMap", "metadata": {"name": "latencies", "namespace": "ns"}}
    kube.add(profile | {"data": {"profile.csv": "measured on Monday"}})
    pool = example_pool(latencyProfile={"configMap": "latencies"})
    kube.add(pool)
    name = pool["metadata"]["name"]
    async with Operator(kube) as op:
        first = await op.reconcile(SERVING_POOL, reconcile, "ns", name)
        assert first.error is None and seen == ["measured on Monday"]
        assert first.requeue_after == controller.LATENCY_PROFILE_CHECK_SECONDS
        assert (await op.reconcile(SERVING_POOL, reconcile, "ns", name)).error is None
        assert len(seen) == 1  # the same text: the plan stands
        await kube.patch("ConfigMap", "ns", "latencies", {"data": {"profile.csv": "measured on Tuesday"}})
        assert (await op.reconcile(SERVING_POOL, reconcile, "ns", name)).error is None
        assert seen == ["measured on Monday", "measured on Tuesday"]
        stored = kube.stored("ServingPool", "ns", name)["status"]["plan"]  # type: ignore[index]
        assert stored["latencyProfileDigest"] == pool_plan.profile_digest("measured on Tuesday")


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
    kube = h100_cluster(1)
    names = []
    for i in range(3):
        pool = example_pool()
        pool["metadata"]["name"] = f"pool-{i}"
        kube.add(pool)
        names.append(pool["metadata"]["name"])
    async with Operator(kube) as op:
        op.memo[controller.PLANNING_LOCK_MEMO] = asyncio.Lock()
        passes = await asyncio.gather(*(op.reconcile(SERVING_POOL, reconcile, "ns", n) for n in names))
        assert all(p.error is None for p in passes)
        assert most == 1


async def test_the_activators_wake_request_scales_a_pool_at_zero_back_to_its_planned_size() -> None:
    kube = h100_cluster(1)
    pool = example_pool(
        mode="disaggregated",
        minGpus=0,
        autoscaling={"scaleToZeroAfter": "5m"},
        activator={"maxQueue": 7, "maxWait": "2m"},
    )
    kube.add(pool)
    name = pool["metadata"]["name"]
    async with Operator(kube) as op:
        await op.reconcile(SERVING_POOL, reconcile, "ns", name)
        planned = kube.stored("ServingPool", "ns", name)["status"]["plan"]  # type: ignore[index]
        # The front door is the activator, with its limits, in front of the router pods.
        service = kube.stored("Service", "ns", name)
        assert (
            service is not None and service["spec"]["selector"]["app.kubernetes.io/component"] == "activator"
        )
        activator = kube.stored("Deployment", "ns", f"{name}-activator")
        assert activator is not None
        args = activator["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--phases") + 1] == "prefill,decode"
        assert args[args.index("--max-queue") + 1] == "7" and args[args.index("--max-wait") + 1] == "2m"
        role = kube.stored("Role", "ns", f"{name}-activator")
        assert role is not None and role["rules"][1] == {
            "apiGroups": ["ampacity.dev"],
            "resources": ["servingpools/status"],
            "resourceNames": [name],
            "verbs": ["patch"],
        }

        # Idle past scaleToZeroAfter: at zero.
        idle = {"prefillReplicas": 0, "decodeReplicas": 0, "lastRequestTime": "2026-01-01T00:00:00Z"}
        await kube.patch_status("ServingPool", "ns", name, {"autoscaling": idle})
        await op.reconcile(SERVING_POOL, reconcile, "ns", name)
        assert kube.stored("Deployment", "ns", f"{name}-prefill")["spec"]["replicas"] == 0  # type: ignore[index]
        assert kube.stored("ServingPool", "ns", name)["status"]["tier"] == "stopped"  # type: ignore[index]

        # The activator holds a request and asks (its own status field): both phases come back.
        activation = {"wakeRequestedAt": "2026-01-01T01:00:00Z", "heldRequests": 3, "wakes": 1}
        await kube.patch_status("ServingPool", "ns", name, {"activation": activation})
        woke = await op.reconcile(SERVING_POOL, reconcile, "ns", name)
        assert any(reason == "Woken" for _, reason, _ in woke.events)
        assert woke.patch is not None and "activation" not in woke.patch  # never written by the operator
        prefill = kube.stored("Deployment", "ns", f"{name}-prefill")
        decode = kube.stored("Deployment", "ns", f"{name}-decode")
        assert prefill is not None and decode is not None
        assert prefill["spec"]["replicas"] == planned["prefillReplicas"] > 0
        assert decode["spec"]["replicas"] == planned["decodeReplicas"] > 0
        status = kube.stored("ServingPool", "ns", name)["status"]  # type: ignore[index]
        assert status["autoscaling"]["reason"] == "woken by the activator (3 requests held)"
        assert status["activation"] == activation and status["tier"] == "waking"
        # The same request seen again changes nothing.
        again = await op.reconcile(SERVING_POOL, reconcile, "ns", name)
        assert not any(reason == "Woken" for _, reason, _ in again.events)


async def test_engines_of_a_sleep_group_run_with_sleep_mode_and_ask_for_host_memory() -> None:
    kube = h100_cluster(1)
    pool = example_pool(
        mode="colocated", autoscaling={"cooldown": "5m"}, sleep={"group": "chat", "hostMemory": "140Gi"}
    )
    pool["spec"]["engine"]["resources"] = {}
    kube.add(pool)
    name = pool["metadata"]["name"]
    async with Operator(kube) as op:
        await op.reconcile(SERVING_POOL, reconcile, "ns", name)
    engine = kube.stored("Deployment", "ns", f"{name}-engine")
    assert engine is not None
    (container,) = engine["spec"]["template"]["spec"]["containers"]
    assert "--enable-sleep-mode" in container["args"]
    assert {"name": "VLLM_SERVER_DEV_MODE", "value": "1"} in container["env"]
    assert container["resources"]["requests"]["memory"] == "140Gi"


async def test_a_new_pool_sends_its_children_in_the_first_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load a new pool's children go before everything else, the rest of its first pass
    (RBAC, status) next, and a later pass's requests after both (`ampacity.kube.Lane`)."""
    from ampacity.kube import LANE, Lane

    kube = h100_cluster(2)
    pool = example_pool()
    kube.add(pool)
    name = pool["metadata"]["name"]
    lanes: list[tuple[str, str, Lane]] = []
    for verb in ("apply", "patch_status"):
        sent = getattr(kube, verb)

        async def record(*args: Any, _verb: str = verb, _sent: Any = sent) -> Any:
            kind = args[0]["kind"] if _verb == "apply" else args[0]
            lanes.append((_verb, kind, LANE.get()))
            return await _sent(*args)

        monkeypatch.setattr(kube, verb, record)
    async with Operator(kube) as op:
        assert (await op.reconcile(SERVING_POOL, reconcile, "ns", name)).error is None
        assert {lane for verb, kind, lane in lanes if kind in ("Deployment", "Service")} == {
            Lane.FIRST_CHILDREN
        }
        assert {lane for verb, kind, lane in lanes if kind in ("Role", "ServingPool")} == {
            Lane.NEW_GENERATION
        }
        lanes.clear()
        for d in kube.of_kind("Deployment"):
            await kube.patch_status("Deployment", "ns", d["metadata"]["name"], {"readyReplicas": 1})
        assert (await op.reconcile(SERVING_POOL, reconcile, "ns", name)).error is None
        assert lanes and {lane for _, _, lane in lanes} == {Lane.ROUTINE}


async def test_pools_with_equal_specs_are_planned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's plan memo: a second pool with the same spec takes the first one's plan
    without planning (nor the planning lock and its thread)."""
    from controllers.servingpool import controller
    from controllers.servingpool.plan import PlanMemo

    planned: list[str] = []
    plan_pool = controller.plan_pool

    def counting(spec: Any, profile: str | None = None) -> Any:
        planned.append(spec.model.name)
        return plan_pool(spec, profile)

    monkeypatch.setattr(controller, "plan_pool", counting)
    kube = h100_cluster(4)
    names = ("first", "second")
    for name in names:
        pool = example_pool()
        pool["metadata"]["name"] = name
        kube.add(pool)
    async with Operator(kube) as op:
        op.memo[controller.PLAN_MEMO] = PlanMemo()
        for name in names:
            assert (await op.reconcile(SERVING_POOL, reconcile, "ns", name)).error is None
        assert len(planned) == 1
        first, second = (kube.stored("ServingPool", "ns", n)["status"]["plan"] for n in names)  # type: ignore[index]
        assert first == second and first["gpus"] > 0
