"""ServingPool reconciler: plan the pool, then run one Deployment and Service per engine role."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from ampacity.api import SERVING_POOL
from ampacity.api.gpu import GPU_PRODUCT_LABEL, GPU_RESOURCE, GPU_TYPE_LABEL
from ampacity.api.servingpool import AutoscalingStatus, ServingPlan, ServingPoolSpec
from ampacity.serving.placement import affinity_weights, node_from_labels, preferred_affinity, rank
from ampacity.serving.pool_plan import profile_digest, resolve_model
from ampacity.serving.replan import MetricsSnapshot, parse_metrics
from controllers import metrics
from controllers.reconciler import Context, controller, manifest_digest
from controllers.servingpool import children
from controllers.servingpool.autoscale import (
    FIRST_PHASE,
    LAST_PHASE,
    EngineScrape,
    Scrape,
    busy,
    next_size,
    phase_increase,
    planned_size,
    pool_tier,
    woken,
)
from controllers.servingpool.plan import (
    LATENCY_PROFILE_INVALID,
    PLANNED_CONDITION,
    PlanMemo,
    PlanningError,
    SizedPlan,
    plan_pool,
    record_plan,
    record_planning_error,
)
from controllers.servingpool.sleep import reconcile_sleep

CAPACITY_LIMITED = "CapacityLimited"
ACTIVATION = "activation"
METRICS_AVAILABLE = "MetricsAvailable"
METRICS_MEMO = "serving_metrics"
#: Where the operator-wide planning lock sits in kopf's memo (`controllers.settings`).
PLANNING_LOCK_MEMO = "planning_lock"
#: Where the operator-wide memo of plans by their inputs sits (`controllers.settings`).
PLAN_MEMO = "plan_memo"
SCRAPE_TIMEOUT_SECONDS = 3.0
#: An autoscaled pool scrapes its engines this often; other pools run when a child changes.
AUTOSCALE_SECONDS = 10.0
#: A pool whose latency-profile ConfigMap is missing or unreadable reads it again this often.
LATENCY_PROFILE_RETRY_SECONDS = 10.0
#: A pool planned on a latency-profile ConfigMap reads it again this often, to see it edited.
LATENCY_PROFILE_CHECK_SECONDS = 60.0
#: The router runs from the operator's own image, which carries the vllm-router binary.
ROUTER_IMAGE = os.environ.get("AMPACITY_IMAGE", "ghcr.io/ampacity/ampacity:0.1.0")


def _has_gpu(node: dict[str, Any], names: tuple[list[str], list[str]]) -> bool:
    labels = node["metadata"].get("labels", {})
    short, products = names
    return labels.get(GPU_TYPE_LABEL) in short or labels.get(GPU_PRODUCT_LABEL) in products


def warm_node_preferences(
    nodes: list[dict[str, Any]], spec: ServingPoolSpec, tp: int
) -> list[dict[str, Any]]:
    """Node-affinity preferences for the nodes that start an engine fastest (ServerlessLLM's estimate).

    Only the weights' cache tier (node labels models.ampacity.dev/<model>=<tier>) drives them, not
    current GPU use: a preference that moved with load would rewrite the pod template, and so
    restart the engines, on every change. Where no node holds the weights there is nothing to prefer.
    """
    model = resolve_model(spec)
    if model is None:
        return []  # no weight size to estimate load times from
    names = children.gpu_names(spec.gpu_type)  # once, not per node (500 nodes per pass)
    caches = [
        node_from_labels(
            n["metadata"]["name"],
            n["metadata"].get("labels", {}),
            int(n.get("status", {}).get("allocatable", {}).get(GPU_RESOURCE, 0)),
        )
        for n in nodes
        if _has_gpu(n, names)
    ]
    estimates = rank(caches, spec.model.name, model.weight_bytes, tp)
    if len({e.tier for e in estimates}) < 2:
        return []
    return preferred_affinity(affinity_weights(estimates))


#: Per-object memo: the router's RBAC objects as last applied or read back, (digest, when).
RBAC_MEMO = "rbac_verified"
#: How long a verified RBAC object is trusted without a read. The cache does not watch RBAC, so
#: an edit or a deletion by someone else is repaired within this (and on any change of the pool).
RBAC_RECHECK_SECONDS = 300.0


async def _ensure(ctx: Context, obj: dict[str, Any]) -> None:
    """Apply a child the cache does not watch (the router's RBAC) only when it is missing or differs,
    and read it back only when the desired object changed or RBAC_RECHECK_SECONDS passed: a settled
    pool costs no requests for it."""
    key = (obj["kind"], obj["metadata"]["name"])
    digest = manifest_digest(obj)
    verified: dict[tuple[str, str], tuple[str, float]] = ctx.memo.setdefault(RBAC_MEMO, {})
    last = verified.get(key)
    if last is None:  # first sight (a new pool, or the operator restarted): one apply, no read
        await ctx.kube.apply(obj)
        verified[key] = (digest, time.monotonic())
        return
    if last[0] == digest and time.monotonic() - last[1] < RBAC_RECHECK_SECONDS:
        return
    live = await ctx.kube.get(obj["kind"], ctx.namespace, obj["metadata"]["name"])
    fields = ("rules", "roleRef", "subjects")
    if (
        live is None
        or any(live.get(f) != obj.get(f) for f in fields)
        or live["metadata"].get("ownerReferences") != obj["metadata"]["ownerReferences"]
    ):
        await ctx.kube.apply(obj)
    verified[key] = (digest, time.monotonic())


def roles(plan: ServingPlan, size: AutoscalingStatus) -> dict[str, tuple[int, int]]:
    """Engine role -> (replicas, tensor-parallel degree) for a plan at a size."""
    if plan.mode == "disaggregated":
        return {
            "prefill": (size.prefill_replicas, plan.prefill_tensor_parallel),
            "decode": (size.decode_replicas, plan.decode_tensor_parallel),
        }
    return {"engine": (size.prefill_replicas, plan.prefill_tensor_parallel)}


async def _scrape(client: httpx.AsyncClient, url: str) -> MetricsSnapshot:
    response = await client.get(url)
    response.raise_for_status()
    return parse_metrics(response.text, time.time())


async def scrape_pool(ctx: Context, spec: ServingPoolSpec) -> tuple[Scrape, list[str]]:
    """Every Ready engine pod's /metrics (or the one metricsUrl), and what could not be read."""
    assert spec.autoscaling is not None
    if spec.autoscaling.metrics_url:
        targets = {"metricsUrl": (spec.autoscaling.metrics_url, "engine")}
    else:
        selector = f"{ctx.selector()},app.kubernetes.io/component in ({','.join(children.ENGINE_ROLES)})"
        pods = await ctx.cache.pods(ctx.namespace, selector)
        targets = {
            p["metadata"]["name"]: (
                f"http://{p['status']['podIP']}:{spec.engine.port}/metrics",
                p["metadata"]["labels"]["app.kubernetes.io/component"],
            )
            for p in pods
            if p.get("status", {}).get("podIP") and _ready(p) and not p["metadata"].get("deletionTimestamp")
        }
    async with httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_SECONDS) as client:
        results = await asyncio.gather(
            *(_scrape(client, url) for url, _ in targets.values()), return_exceptions=True
        )
    scrape: Scrape = {}
    failed = []
    for (pod, (url, role)), result in zip(targets.items(), results, strict=True):
        if isinstance(result, MetricsSnapshot):
            scrape[pod] = EngineScrape(role, result)
        else:
            failed.append(f"{pod} ({url}): {_describe(result)}")
    return scrape, failed


def _ready(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in pod.get("status", {}).get("conditions", [])
    )


def _describe(error: BaseException) -> str:
    if isinstance(error, httpx.HTTPStatusError):
        return f"HTTP {error.response.status_code}"
    if isinstance(error, httpx.HTTPError):
        return type(error).__name__
    return "not Prometheus text"


def measured_attainment(spec: ServingPoolSpec, before: Scrape | None, after: Scrape) -> float | None:
    """Share of the interval's requests within the TTFT and TPOT objectives, from the engines'
    histograms: TTFT where a request meets its first engine (colocated engines, or prefill engines
    in P/D, whose TTFT leaves out the decode's KV pull and first step), TPOT where it is decoded.
    The objectives are checked one at a time, so this is the attainment of the tighter one (the
    joint attainment is at most this)."""
    if not before:
        return None
    first = phase_increase(before, after, FIRST_PHASE)
    last = phase_increase(before, after, LAST_PHASE)
    tpot = last.request_tpot if last.request_tpot.buckets else last.tpot
    fractions = [
        f
        for f in (first.ttft.fraction_within(spec.slo.ttft), tpot.fraction_within(spec.slo.tpot))
        if f is not None
    ]
    return min(fractions) if fractions else None


async def _autoscale(ctx: Context, plan: ServingPlan, replanned: bool) -> AutoscalingStatus:
    """The size live metrics call for; the last (or planned) size when no engine can be read.
    A new plan (`replanned`: the spec changed) starts again from its own size."""
    spec: ServingPoolSpec = ctx.spec
    assert spec.autoscaling is not None
    previous = None if replanned else ctx.status.autoscaling
    scrape, failed = await scrape_pool(ctx, spec)
    if not scrape and (failed or spec.autoscaling.metrics_url):
        message = "; ".join(failed) or "no engine answered"
        ctx.status.set_condition(METRICS_AVAILABLE, "False", "ScrapeFailed", message, ctx.generation)
        metrics.SERVING_POOL_METRICS_UP.labels(ctx.namespace, ctx.name).set(0)
        return previous or planned_size(plan)
    reason = "Scraped" if not failed else "PartlyScraped"
    message = f"{len(scrape)} engine(s) scraped" + (f"; unreadable: {'; '.join(failed)}" if failed else "")
    ctx.status.set_condition(METRICS_AVAILABLE, "True", reason, message, ctx.generation)
    metrics.SERVING_POOL_METRICS_UP.labels(ctx.namespace, ctx.name).set(1)
    before = None if replanned else ctx.memo.get(METRICS_MEMO)
    ctx.memo[METRICS_MEMO] = scrape
    attainment = measured_attainment(spec, before, scrape)
    if attainment is not None:
        metrics.SERVING_POOL_MEASURED_ATTAINMENT.labels(ctx.namespace, ctx.name).set(attainment)
    size = next_size(spec, plan, previous, before, scrape, datetime.now(UTC))
    old = previous or planned_size(plan)
    if (size.prefill_replicas, size.decode_replicas) != (old.prefill_replicas, old.decode_replicas):
        ctx.event("Autoscaled", f"{size.reason} ({size.observed_rate:g} req/s)")
    return size


def plan_is_current(ctx: Context) -> bool:
    """Whether the plan in status was made for the object's current generation.

    The Planned condition's generation says so, not status.observedGeneration: a pass that failed
    after a spec change (the API server timing out, say) still records the generation it saw, and
    its retry must plan the new spec instead of keeping the old plan for good."""
    planned = ctx.status.condition(PLANNED_CONDITION)
    return (
        ctx.status.plan is not None and planned is not None and planned.observed_generation == ctx.generation
    )


async def _plan(ctx: Context) -> SizedPlan:
    """The plan for the current generation: kept from the last reconcile, or planned anew.

    Planning simulates candidate pools (about a second per plan), so it runs in a
    thread, and only when the spec changed.
    """
    status = ctx.status
    planned = status.condition(PLANNED_CONDITION)
    # A plan kept through an unreadable latency profile is retried until the profile reads.
    replan = planned is not None and planned.reason == LATENCY_PROFILE_INVALID
    profile = None
    if ctx.spec.latency_profile is not None:
        # ConfigMaps are not watched: the profile is read on every pass, and a pass comes at least
        # this often, so an edited profile re-plans the pool within a minute.
        ctx.requeue(LATENCY_PROFILE_CHECK_SECONDS)
        profile = await _latency_profile(ctx)
        replan |= status.plan is not None and status.plan.latency_profile_digest != profile_digest(profile)
    if plan_is_current(ctx) and not replan:
        assert status.plan is not None
        limited = status.condition(CAPACITY_LIMITED)
        return SizedPlan(
            status.plan,
            limited.message if limited and limited.status == "True" else "",
            planned.reason if planned else "Planned",
            planned.message if planned else "",
        )
    # One plan at a time, operator-wide: planning holds the GIL, so plans in parallel threads only
    # starve every other reconcile, and identical pools created together would each plan from
    # scratch (the planner's memo answers the second at once only after the first has finished).
    memo = ctx.memo.get(PLAN_MEMO)
    memo = memo if isinstance(memo, PlanMemo) else PlanMemo()  # outside the operator: this pass's own
    sized = memo.get(ctx.spec, profile)
    if sized is None:
        lock = ctx.memo.get(PLANNING_LOCK_MEMO)
        async with lock if isinstance(lock, asyncio.Lock) else contextlib.nullcontext():
            # A pool that waited for the lock finds the plan an equal pool made meanwhile.
            sized = memo.get(ctx.spec, profile)
            if sized is None:
                sized = await asyncio.to_thread(plan_pool, ctx.spec, profile)
                memo.put(ctx.spec, profile, sized)
    plan = sized.plan
    if not sized.planned:
        ctx.event(sized.reason, sized.message, warning=True)
        return sized
    ctx.event(
        "Planned",
        f"{plan.mode}: {plan.gpus} GPUs for {plan.capacity:g} req/s, "
        f"{plan.predicted_goodput:g} req/s per GPU (best colocated: {plan.colocated_goodput:g})",
    )
    return sized


async def _latency_profile(ctx: Context) -> str | None:
    """The text of the pool's latency-profile ConfigMap key; None when it is missing."""
    ref = ctx.spec.latency_profile
    if ref is None:
        return None
    config_map = await ctx.kube.get("ConfigMap", ctx.namespace, ref.config_map)
    data = (config_map or {}).get("data") or {}
    if ref.key is not None:
        return data.get(ref.key)
    return next(iter(data.values())) if len(data) == 1 else None


async def reconcile(ctx: Context) -> None:
    spec: ServingPoolSpec = ctx.spec
    # status.activation is the activator's: it is read here, never written.
    ctx.status_fields_not_owned = {ACTIVATION}
    replanned = not plan_is_current(ctx)
    try:
        sized = await _plan(ctx)
    except PlanningError as error:
        if error.reason == LATENCY_PROFILE_INVALID:
            # ConfigMaps are not watched: read the profile again soon.
            ctx.requeue(LATENCY_PROFILE_RETRY_SECONDS)
        before = ctx.status.condition(PLANNED_CONDITION)
        repeated = (
            before is not None and before.reason == error.reason and before.message.startswith(str(error))
        )
        if not record_planning_error(ctx.status, error, ctx.generation):
            ctx.set_ready(False, error.reason, str(error))
            return
        if not repeated:
            ctx.event(error.reason, str(error), warning=True)
        assert ctx.status.plan is not None
        sized = SizedPlan(ctx.status.plan)
    else:
        record_plan(ctx.status, sized, ctx.generation)
    plan = ctx.status.plan = sized.plan
    ctx.status.set_condition(
        CAPACITY_LIMITED,
        "True" if sized.limited_by else "False",
        "MaxGpus" if sized.limited_by else "PeakRateCovered",
        sized.limited_by or f"the pool sustains {plan.capacity:g} req/s",
        ctx.generation,
    )

    if spec.autoscaling:
        ctx.requeue(AUTOSCALE_SECONDS)  # the engines' metrics are scraped, not watched
        scaled = await _autoscale(ctx, plan, replanned)
        size = woken(plan, scaled, ctx.status.activation)
        if size.prefill_replicas and not scaled.prefill_replicas:
            ctx.event("Woken", size.reason)
    else:
        size = planned_size(plan)
    ctx.status.autoscaling = size if spec.autoscaling else None
    wanted = roles(plan, size)
    nodes = await ctx.cache.nodes()
    disaggregated = plan.mode == "disaggregated"
    try:
        deployments = [
            children.engine_deployment(
                ctx, spec, role, r, tp, warm_node_preferences(nodes, spec, tp), plan.prefill_chunk_tokens
            )
            for role, (r, tp) in wanted.items()
        ]
    except children.InvalidEngineSpec as error:
        ctx.set_ready(False, "InvalidSpec", str(error))
        return
    engines = {d["metadata"]["name"] for d in deployments}
    service = children.pool_service(ctx, spec)
    rbac = children.router_rbac(ctx) + (children.activator_rbac(ctx) if spec.activated else [])
    front = [children.router_deployment(ctx, spec, ROUTER_IMAGE, disaggregated)]
    if spec.activated:
        front.append(children.activator_deployment(ctx, spec, ROUTER_IMAGE, list(wanted)))
    # Children go out together, not one request after another, so a new pool's first children
    # come within one API round trip. The engines and the Service need no RBAC; the router and
    # the activator run as their own ServiceAccounts and go once those exist (a ReplicaSet whose
    # ServiceAccount is missing backs off before it tries the pod again).
    _, applied = await asyncio.gather(
        asyncio.gather(*(_ensure(ctx, o) for o in rbac)),
        asyncio.gather(*(ctx.apply(o) for o in [*deployments, service])),
    )
    applied += await asyncio.gather(*(ctx.apply(o) for o in front))
    # Engine Deployments and Services come and go with the mode; the router's RBAC stays.
    desired_names = {(o["kind"], o["metadata"]["name"]) for o in [*deployments, *front, service]}
    for kind in ("Deployment", "Service"):
        keep = {name for k, name in desired_names if k == kind}
        await ctx.cache.prune(kind, ctx.namespace, ctx.selector(), keep)
    ctx.status.endpoint = children.endpoint(ctx, spec)

    desired = sum(d["spec"]["replicas"] for d in deployments)
    ready = sum(
        d.get("status", {}).get("readyReplicas", 0)
        for d in applied
        if d["kind"] == "Deployment" and d["metadata"]["name"] in engines
    )
    ctx.status.replicas, ctx.status.ready_replicas = desired, ready
    ctx.status.sleep = None
    if spec.sleep is not None:
        own_busy = busy(ctx.memo.get(METRICS_MEMO) or {})
        ctx.status.sleep = await reconcile_sleep(ctx, own_busy, datetime.now(UTC))
    ctx.status.tier = pool_tier(desired, ready, ctx.status.sleep) if spec.activated else None
    metrics.SERVING_POOL_GPUS.labels(ctx.namespace, ctx.name).set(plan.gpus)
    metrics.SERVING_POOL_READY_REPLICAS.labels(ctx.namespace, ctx.name).set(ready)
    metrics.SERVING_POOL_REPLICAS.labels(ctx.namespace, ctx.name).set(desired)
    metrics.SERVING_POOL_PREDICTED_ATTAINMENT.labels(ctx.namespace, ctx.name).set(plan.predicted_attainment)
    metrics.SERVING_POOL_ATTAINMENT_OBJECTIVE.labels(ctx.namespace, ctx.name).set(spec.slo.attainment)
    metrics.SERVING_POOL_CAPACITY.labels(ctx.namespace, ctx.name).set(plan.capacity)
    if desired == 0:
        ctx.set_ready(True, "ScaledToZero", "no engine instances are planned")
    elif ready < desired:
        ctx.set_ready(False, "EnginesStarting", f"{ready}/{desired} engine instances ready")
    else:
        ctx.set_ready(True, "EnginesReady", f"{ready}/{desired} engine instances ready")


def wake_request(body: Any) -> object:
    """The activator's wake request (status.activation.wakeRequestedAt): reconcile at once on it."""
    return ((body.get("status") or {}).get(ACTIVATION) or {}).get("wakeRequestedAt")


controller(SERVING_POOL, reconcile, trigger=wake_request)
