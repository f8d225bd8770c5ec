"""PowerBudget reconciler: aggregate node telemetry, run the capping policy, assign caps.

Each selected node gets a NodePower (named after the node, owned by the Node). Its node
agent writes GPU telemetry into the status; this controller turns the telemetry of all the
budget's nodes into one `ampacity.power.policy.evaluate` round and writes each node's caps
into its spec. A round runs on every fresh telemetry report (the operator-wide
`controllers.powerbudget.runtime.PowerRuntime` watches NodePowers, so a surge is answered
within the round trip of the watch, not a timer period) and on the budget's timer, which
also refreshes `assignedAt` so that agents can tell a live operator from a dead one. The
policy's memory (caps and their age, hysteresis windows, peak) lives in the runtime and is
saved to `status.policyState`, so a restarted operator resumes it.

Gather (nodes, budgets, NodePowers, running pods) -> decide (pure: priorities from the
agents' GPU-to-pod maps, `ampacity.power.policy.evaluate`) -> act (assignments, status).
Ready is False, naming the nodes, where an agent cannot apply caps (NVML missing or
refusing): nothing claims a cap that was not applied.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import kopf

from ampacity.api import NODE_POWER, POWER_BUDGET
from ampacity.api.gpu import GPU_RESOURCE, pod_gpus
from ampacity.api.meta import LABEL_PREFIX
from ampacity.api.nodepower import NodePowerStatus, PodResourcesState
from ampacity.api.powerbudget import CappedNode, NodeSelector, PowerBudgetSpec
from ampacity.power.budget import Actuator, BudgetSpec, PriorityClass
from ampacity.power.policy import EventKind, Level, PolicyResult, PolicyState
from controllers import metrics
from controllers.powerbudget.runtime import BUDGET_LABEL, BudgetRuntime, PowerRuntime, telemetry_of
from controllers.reconciler import Context, controller

#: Pods choose their GPUs' power priority class with this label.
PRIORITY_LABEL = f"{LABEL_PREFIX}/power-priority"
#: Where the operator-wide `PowerRuntime` lives in kopf's memo (built in `controllers.settings`).
POWER_MEMO = "power"
#: How often the timer reconciles a budget (status, metrics, assignment heartbeat).
INTERVAL_SECONDS = 2.0
LEVEL_NAMES = {Level.NORMAL: "Normal", Level.T1: "T1", Level.T2: "T2"}
__all__ = ["BUDGET_LABEL", "PRIORITY_LABEL", "reconcile", "telemetry_of"]


def label_selector(selector: NodeSelector) -> str:
    """The metav1.LabelSelector as the API server's `labelSelector` query string."""
    terms = [f"{key}={value}" for key, value in sorted(selector.match_labels.items())]
    for requirement in selector.match_expressions:
        values = ",".join(requirement.values)
        terms.append(
            {
                "In": f"{requirement.key} in ({values})",
                "NotIn": f"{requirement.key} notin ({values})",
                "Exists": requirement.key,
                "DoesNotExist": f"!{requirement.key}",
            }[requirement.operator]
        )
    return ",".join(terms)


def policy_budget(spec: PowerBudgetSpec) -> BudgetSpec:
    """The PowerBudget spec as the pure policy's `BudgetSpec`."""
    return BudgetSpec(
        limit_watts=spec.limit_watts,
        classes=tuple(PriorityClass(c.name, c.priority, c.min_cap_watts) for c in spec.priority_classes),
        t1_fraction=spec.thresholds.t1,
        t2_fraction=spec.thresholds.t2,
        hold_seconds=spec.release_hold,
        staleness_seconds=spec.telemetry_staleness,
        safe_cap_watts=spec.safe_cap_watts,
        actuator=Actuator(spec.actuator),
    )


def gpu_priorities(
    pods: Sequence[Mapping[str, Any]], nodes: set[str], default_class: str
) -> dict[str, dict[int, str]]:
    """Priority class per node and GPU index, from the running pods that request GPUs.

    The API server does not say which GPU indices the device plugin gave a pod, so pods
    take consecutive indices in creation order; GPUs without a pod are idle and fall to the
    lowest class. (The kubelet's pod-resources API would give the real indices on the node.)
    """
    result: dict[str, dict[int, str]] = {node: {} for node in nodes}
    ordered = sorted(
        pods,
        key=lambda p: (
            p["metadata"].get("creationTimestamp", ""),
            p["metadata"].get("namespace", ""),
            p["metadata"]["name"],
        ),
    )
    for pod in ordered:
        node = pod.get("spec", {}).get("nodeName")
        gpus = pod_gpus(pod)
        if node not in result or gpus <= 0:
            continue
        priority = pod["metadata"].get("labels", {}).get(PRIORITY_LABEL, default_class)
        taken = result[node]
        start = len(taken)
        for index in range(start, start + gpus):
            taken[index] = priority
    return result


def _restore_state(raw: str) -> PolicyState | None:
    if not raw:
        return None
    try:
        return PolicyState.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        return None


def node_priorities(
    statuses: Mapping[str, NodePowerStatus],
    pods: Sequence[Mapping[str, Any]],
    nodes: set[str],
    default_class: str,
) -> dict[str, dict[int, str]]:
    """Priority class per node and GPU index.

    Where the node's agent reports the kubelet's GPU-to-pod map (`attribution: Kubelet`), each
    GPU takes the class of the pod holding it and a GPU without a pod is idle (lowest class).
    Elsewhere (no pod-resources socket, e.g. simulated nodes) the GPUs are guessed from the
    running pods in creation order, and `guessed_nodes` names those nodes in the condition.
    """
    labels = {
        f"{p['metadata'].get('namespace', '')}/{p['metadata']['name']}": p["metadata"].get("labels") or {}
        for p in pods
    }
    guessed = gpu_priorities(pods, nodes, default_class)
    result: dict[str, dict[int, str]] = {}
    for node in nodes:
        status = statuses.get(node)
        if status is None or status.attribution != PodResourcesState.KUBELET:
            result[node] = guessed.get(node, {})
            continue
        result[node] = {
            g.index: (labels.get(g.pod) or {}).get(PRIORITY_LABEL, default_class)
            for g in status.gpus
            if g.pod and g.pod in labels
        }
    return result


def guessed_nodes(statuses: Mapping[str, NodePowerStatus], nodes: set[str]) -> list[str]:
    """Nodes whose GPU-to-pod map is guessed (their agent has no kubelet pod-resources API)."""
    return sorted(
        n
        for n in nodes
        if (s := statuses.get(n)) is not None
        and s.sampled_at is not None
        and s.attribution != PodResourcesState.KUBELET
    )


def _listing(nodes: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(nodes[:limit])
    return f"{shown} and {len(nodes) - limit} more" if len(nodes) > limit else shown


async def reconcile(ctx: Context) -> None:
    spec: PowerBudgetSpec = ctx.spec
    kube = ctx.kube
    power: PowerRuntime = ctx.memo[POWER_MEMO]
    power.adopt_context()
    uid = str(ctx.body.metadata.uid)

    # Gather: the nodes, NodePowers and GPU-holding pods from the operator's read cache; the
    # budgets from the API server (few, and a missed deletion must be seen).
    nodes = await ctx.cache.nodes(label_selector(spec.node_selector))
    existing = {b["metadata"]["name"] for b in await kube.list_objects(POWER_BUDGET.kind, None)}
    node_powers = await ctx.cache.node_powers()
    pods = [p for p in await ctx.cache.pods() if (p.get("status") or {}).get("phase") == "Running"]
    rt = power.budget(ctx.name, uid, spec, policy_budget(spec))
    if rt is None:
        return  # a timer that fired as the budget was deleted
    if rt.state is None:
        rt.state = _restore_state(ctx.status.policy_state)
    power.forget_missing(existing)

    # A node already assigned by another existing budget stays with it; NodePowers of budgets
    # that no longer exist (their deletion was missed) go, and their agents restore the limits.
    for obj in node_powers:
        power.remember(obj)
    owner = {o["metadata"]["name"]: str(o.get("spec", {}).get("budget", "")) for o in node_powers}
    others = {n for n, b in owner.items() if b != ctx.name and b in existing}
    selected = {x["metadata"]["name"] for x in nodes}
    for name in [n for n, b in owner.items() if b not in existing and n not in selected]:
        await kube.delete(NODE_POWER.kind, None, name)
        power.forget_node(name)
    claimed = [n for n in nodes if n["metadata"]["name"] not in others]
    rt.nodes = {n["metadata"]["name"]: n["metadata"]["uid"] for n in claimed}
    gpus = sum(int(n.get("status", {}).get("capacity", {}).get(GPU_RESOURCE, 0)) for n in claimed)
    statuses = {node: power.status_of(node) for node in rt.nodes}
    rt.priorities = node_priorities(statuses, pods, set(rt.nodes), spec.default_priority_class)
    if power.was_deleted(uid):  # deleted while this reconcile listed
        return

    # Decide and act: a policy round (it also writes the changed assignments), then status.
    await power.run_rounds(rt)
    for name in await kube.prune("NodePower", "", f"{BUDGET_LABEL}={ctx.name}", keep=set(rt.nodes)):
        power.forget_node(name)

    status = ctx.status
    status.nodes, status.gpus = len(rt.nodes), gpus
    status.reporting_nodes = rt.reporting
    status.failsafe_nodes = rt.failsafe_nodes
    status.unenforced_nodes = sorted(rt.unenforced)
    metrics.POWER_BUDGET_LIMIT.labels("", ctx.name).set(spec.limit_watts)
    metrics.POWER_BUDGET_NODES.labels("", ctx.name).set(len(rt.nodes))
    metrics.POWER_BUDGET_UNENFORCED_NODES.labels("", ctx.name).set(len(rt.unenforced))
    result = rt.result
    if result is not None:
        summary = result.summary
        status.current_watts = round(summary.total_watts, 1)
        status.peak_watts = round(summary.peak_watts, 1)
        status.overruns = summary.overrun_count
        status.level = LEVEL_NAMES[summary.level]
        status.capped_gpus = summary.capped_gpus
        status.capped_nodes = _capped_nodes(result)
        status.policy_state = json.dumps(result.state.to_dict(), separators=(",", ":"))
    status.headroom_watts = round(spec.limit_watts - status.current_watts, 1)
    notes = ""
    if others:
        notes += f"; {len(nodes) - len(claimed)} selected nodes belong to another budget"
    guessed = guessed_nodes(statuses, set(rt.nodes))
    if guessed:
        notes += (
            f"; GPU-to-pod map guessed from pod order on {len(guessed)} nodes without the kubelet "
            f"pod-resources API ({_listing(guessed)})"
        )
    _set_ready(ctx, spec, rt, nodes, gpus, notes)


def _set_ready(
    ctx: Context, spec: PowerBudgetSpec, rt: BudgetRuntime, nodes: list[Any], gpus: int, notes: str
) -> None:
    status, result = ctx.status, rt.result
    if not nodes:
        ctx.set_ready(False, "NoNodesSelected", "the node selector matches no node")
    elif rt.unenforced:
        failing = sorted(rt.unenforced)
        words = "; ".join(f"{n} ({rt.unenforced[n]})" for n in failing[:5])
        more = f"; and {len(failing) - 5} more" if len(failing) > 5 else ""
        ctx.set_ready(
            False,
            "NotEnforcing",
            f"caps cannot be applied on {len(failing)} of {len(rt.nodes)} nodes: {words}{more}{notes}",
        )
    elif result is None:
        ctx.set_ready(
            False,
            "AwaitingTelemetry",
            f"{len(rt.nodes)} nodes with {gpus} GPUs selected; no node agent has reported power yet{notes}",
        )
    elif result.summary.infeasible:
        ctx.set_ready(
            False,
            "LimitBelowFloors",
            f"limit {spec.limit_watts:.0f} W is below the sum of the GPUs' minimum caps "
            f"({result.summary.floor_watts:.0f} W): every GPU is held at its minimum cap{notes}",
        )
    elif rt.reporting < len(rt.nodes):
        missing = len(rt.nodes) - rt.reporting
        ctx.set_ready(
            False,
            "TelemetryStale",
            f"{missing} of {len(rt.nodes)} nodes without fresh telemetry (stale GPUs count at their limits); "
            f"power {status.current_watts:.0f} W of {spec.limit_watts:.0f} W{notes}",
        )
    else:
        ctx.set_ready(
            True,
            "Enforcing",
            f"power {status.current_watts:.0f} W of {spec.limit_watts:.0f} W, level {status.level}, "
            f"{status.capped_gpus} GPUs capped{notes}",
        )


def _capped_nodes(result: PolicyResult) -> list[CappedNode]:
    capped: dict[str, tuple[float, float]] = {}
    for a in result.assignments:
        if a.capped and a.since is not None:
            total, since = capped.get(a.gpu.node, (0.0, a.since))
            capped[a.gpu.node] = (total + a.cap_watts, min(since, a.since))
    return [
        CappedNode(node=node, cap_watts=total, since=datetime.fromtimestamp(since, UTC))
        for node, (total, since) in sorted(capped.items())
    ]


async def release_nodes(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A deleted budget releases its nodes: their NodePowers go, and agents restore the limits.
    The budget is kept until this has run (kopf's finalizer), even if the operator was down when
    it was deleted: the NodePowers are owned by their Nodes, not by the budget."""
    name = str(body.metadata.name)
    power: PowerRuntime = memo[POWER_MEMO]
    power.deleted(name, str(body.metadata.uid))
    for reason in EventKind:
        with contextlib.suppress(KeyError):
            metrics.POWER_BUDGET_CROSSINGS.remove("", name, reason.value)
    for node in await memo["kube"].prune("NodePower", "", f"{BUDGET_LABEL}={name}", keep=set()):
        power.forget_node(node)


controller(POWER_BUDGET, reconcile, interval=INTERVAL_SECONDS, release=release_nodes)
