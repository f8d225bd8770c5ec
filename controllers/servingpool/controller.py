"""ServingPool reconciler: plan the pool, then run one Deployment and Service per engine role."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from ampacity.api import SERVING_POOL
from ampacity.api.gpu import GPU_PRODUCT_LABEL, GPU_RESOURCE, GPU_TYPE_LABEL
from ampacity.api.gpu_products import gpu_product
from ampacity.api.servingpool import AutoscalingStatus, ServingPlan, ServingPoolSpec
from ampacity.serving.placement import affinity_weights, node_from_labels, preferred_affinity, rank
from ampacity.serving.pool_plan import resolve_model
from ampacity.serving.replan import parse_metrics
from controllers import metrics
from controllers.reconciler import Context, controller
from controllers.servingpool.autoscale import next_size, planned_size
from controllers.servingpool.plan import (
    LATENCY_PROFILE_INVALID,
    PLANNED_CONDITION,
    PlanningError,
    SizedPlan,
    plan_pool,
    record_plan,
    record_planning_error,
)

CAPACITY_LIMITED = "CapacityLimited"
METRICS_AVAILABLE = "MetricsAvailable"
METRICS_MEMO = "serving_metrics"


def _gpu_names(gpu_type: str) -> tuple[list[str], list[str]]:
    """(short types, GFD product labels) a gpuType matches: a catalogued GPU by either name."""
    try:
        product = gpu_product(gpu_type)
    except KeyError:
        return [gpu_type], [gpu_type]
    return sorted({gpu_type, product.short_name}), sorted({gpu_type, product.product})


def _has_gpu(node: dict[str, Any], gpu_type: str) -> bool:
    labels = node["metadata"].get("labels", {})
    short, products = _gpu_names(gpu_type)
    return labels.get(GPU_TYPE_LABEL) in short or labels.get(GPU_PRODUCT_LABEL) in products


def _affinity(gpu_type: str, preferences: list[dict[str, Any]]) -> dict[str, Any]:
    """Only nodes with the requested GPU (short type or NVIDIA's product label); warm ones first."""
    short, products = _gpu_names(gpu_type)
    terms = [
        {"matchExpressions": [{"key": GPU_TYPE_LABEL, "operator": "In", "values": short}]},
        {"matchExpressions": [{"key": GPU_PRODUCT_LABEL, "operator": "In", "values": products}]},
    ]
    node_affinity: dict[str, Any] = {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}
    }
    if preferences:
        node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] = preferences
    return {"nodeAffinity": node_affinity}


def warm_node_preferences(
    nodes: list[dict[str, Any]], spec: ServingPoolSpec, tp: int
) -> list[dict[str, Any]]:
    """Node-affinity preferences for the nodes that start an engine fastest (ServerlessLLM's estimate).

    Only the weights' cache tier (node labels models.ampacity.dev/<model>=<tier>) drives them, not
    current GPU use: a preference that moved with load would rewrite the pod template, and so
    restart the engines, on every change. Where no node holds the weights there is nothing to prefer.
    """
    caches = [
        node_from_labels(
            n["metadata"]["name"],
            n["metadata"].get("labels", {}),
            int(n.get("status", {}).get("allocatable", {}).get(GPU_RESOURCE, 0)),
        )
        for n in nodes
        if _has_gpu(n, spec.gpu_type)
    ]
    model = resolve_model(spec)
    if model is None:
        return []  # no weight size to estimate load times from
    estimates = rank(caches, spec.model.name, model.weight_bytes, tp)
    if len({e.tier for e in estimates}) < 2:
        return []
    return preferred_affinity(affinity_weights(estimates))


def engine_deployment(
    ctx: Context,
    spec: ServingPoolSpec,
    role: str,
    replicas: int,
    tp: int,
    preferences: list[dict[str, Any]],
    chunk: int = 0,
) -> dict[str, Any]:
    """One engine role (colocated, prefill or decode) as a Deployment.

    The engine reads its role and parallelism from the environment; args may
    reference them as $(AMPACITY_TENSOR_PARALLEL), which Kubernetes expands.
    """
    name = f"{ctx.name}-{role}"
    labels = ctx.child_labels(role)
    env = [
        {"name": "AMPACITY_ROLE", "value": role},
        {"name": "AMPACITY_MODEL", "value": spec.model.name},
        {"name": "AMPACITY_MODEL_URI", "value": spec.model.uri},
        {"name": "AMPACITY_TENSOR_PARALLEL", "value": str(tp)},
        {"name": "AMPACITY_PREFILL_CHUNK", "value": str(chunk)},
        {"name": "AMPACITY_PORT", "value": str(spec.engine.port)},
    ]
    container = {
        "name": "engine",
        "image": spec.engine.image,
        "args": list(spec.engine.args),
        "env": env,
        "ports": [{"name": "http", "containerPort": spec.engine.port}],
        "resources": {"limits": {GPU_RESOURCE: str(tp)}, "requests": {GPU_RESOURCE: str(tp)}},
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": ctx.child_metadata(name, role),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [container], "affinity": _affinity(spec.gpu_type, preferences)},
            },
        },
    }


def role_service(ctx: Context, spec: ServingPoolSpec, name: str, role: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.child_metadata(name, role),
        "spec": {
            "selector": ctx.child_labels(role),
            "ports": [{"name": "http", "port": spec.engine.port, "targetPort": "http"}],
        },
    }


def roles(plan: ServingPlan, size: AutoscalingStatus) -> dict[str, tuple[int, int]]:
    """Engine role -> (replicas, tensor-parallel degree) for a plan at a size."""
    if plan.mode == "disaggregated":
        return {
            "prefill": (size.prefill_replicas, plan.prefill_tensor_parallel),
            "decode": (size.decode_replicas, plan.decode_tensor_parallel),
        }
    return {"engine": (size.prefill_replicas, plan.prefill_tensor_parallel)}


async def _autoscale(ctx: Context, plan: ServingPlan) -> AutoscalingStatus:
    """The size live metrics call for; the planned size when they cannot be read."""
    spec: ServingPoolSpec = ctx.spec
    assert spec.autoscaling is not None
    # A new plan (spec change) starts again from its own size.
    replanned = ctx.status.observed_generation != ctx.generation
    previous = None if replanned else ctx.status.autoscaling
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(spec.autoscaling.metrics_url)
            response.raise_for_status()
    except httpx.HTTPError as error:
        ctx.status.set_condition(METRICS_AVAILABLE, "False", "ScrapeFailed", str(error), ctx.generation)
        return previous or planned_size(plan)
    ctx.status.set_condition(
        METRICS_AVAILABLE, "True", "Scraped", spec.autoscaling.metrics_url, ctx.generation
    )
    snapshot = parse_metrics(response.text, time.time())
    before = None if replanned else ctx.memo.get(METRICS_MEMO)
    ctx.memo[METRICS_MEMO] = snapshot
    size = next_size(spec, plan, previous, before, snapshot, datetime.now(UTC))
    old = previous or planned_size(plan)
    if (size.prefill_replicas, size.decode_replicas) != (old.prefill_replicas, old.decode_replicas):
        ctx.event("Autoscaled", f"{size.reason} ({size.observed_rate:g} req/s)")
    return size


async def _plan(ctx: Context) -> SizedPlan:
    """The plan for the current generation: kept from the last reconcile, or planned anew.

    Planning simulates candidate pools (about a second per plan), so it runs in a
    thread, and only when the spec changed.
    """
    status = ctx.status
    planned = status.condition(PLANNED_CONDITION)
    # A plan kept through an unreadable latency profile is retried until the profile reads.
    retry = planned is not None and planned.reason == LATENCY_PROFILE_INVALID
    if status.plan is not None and status.observed_generation == ctx.generation and not retry:
        limited = status.condition(CAPACITY_LIMITED)
        return SizedPlan(
            status.plan,
            limited.message if limited and limited.status == "True" else "",
            planned.reason if planned else "Planned",
            planned.message if planned else "",
        )
    sized = await asyncio.to_thread(plan_pool, ctx.spec, await _latency_profile(ctx))
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
    try:
        sized = await _plan(ctx)
    except PlanningError as error:
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

    size = await _autoscale(ctx, plan) if spec.autoscaling else planned_size(plan)
    ctx.status.autoscaling = size if spec.autoscaling else None
    wanted = roles(plan, size)
    nodes = await ctx.cache.nodes()
    deployments = [
        engine_deployment(
            ctx, spec, role, r, tp, warm_node_preferences(nodes, spec, tp), plan.prefill_chunk_tokens
        )
        for role, (r, tp) in wanted.items()
    ]
    # The front door routes to the first phase a request meets (prefill or the colocated engine).
    front_role = "prefill" if plan.mode == "disaggregated" else "engine"
    services = [role_service(ctx, spec, ctx.name, front_role)]
    services += [role_service(ctx, spec, f"{ctx.name}-{role}", role) for role in wanted if role != front_role]
    applied = [await ctx.apply(obj) for obj in deployments + services]
    await ctx.cache.prune(
        "Deployment", ctx.namespace, ctx.selector(), {d["metadata"]["name"] for d in deployments}
    )
    await ctx.cache.prune("Service", ctx.namespace, ctx.selector(), {s["metadata"]["name"] for s in services})

    desired = sum(d["spec"]["replicas"] for d in deployments)
    ready = sum(d.get("status", {}).get("readyReplicas", 0) for d in applied if d["kind"] == "Deployment")
    ctx.status.replicas, ctx.status.ready_replicas = desired, ready
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


controller(SERVING_POOL, reconcile)
