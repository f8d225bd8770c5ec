"""PowerBudget reconciler: aggregate node telemetry, run the capping policy, assign caps.

Each selected node gets a NodePower (named after the node, owned by the Node). Its node
agent writes GPU telemetry into the status; this controller turns the telemetry of all the
budget's nodes into one `ampacity.power.policy.evaluate` round and writes each node's caps
into its spec. A round runs on every fresh telemetry report (a watch on NodePowers, so a
surge is answered within the round trip of the watch, not a timer period) and on the
budget's timer, which also refreshes `assignedAt` so that agents can tell a live operator
from a dead one. The policy's memory (caps and their age, hysteresis windows, peak) lives
in memory and is saved to `status.policyState`, so a restarted operator resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import kopf
from pydantic import ValidationError

from ampacity.api import NODE_POWER, POWER_BUDGET
from ampacity.api.gpu import GPU_RESOURCE, pod_gpus
from ampacity.api.meta import API_VERSION, GROUP, LABEL_PREFIX, VERSION
from ampacity.api.nodepower import GpuAssignment, NodePowerSpec, NodePowerStatus
from ampacity.api.powerbudget import CappedNode, NodeSelector, PowerBudgetSpec
from ampacity.kube import Kube, KubeError
from ampacity.power.budget import BudgetSpec, PriorityClass
from ampacity.power.policy import EventKind, Level, PolicyResult, PolicyState, evaluate
from ampacity.power.telemetry import GpuId, GpuTelemetry
from controllers import metrics
from controllers.reconciler import Context, controller

#: Pods choose their GPUs' power priority class with this label.
PRIORITY_LABEL = f"{LABEL_PREFIX}/power-priority"
#: NodePowers carry the name of the budget that assigns them.
BUDGET_LABEL = f"{LABEL_PREFIX}/powerbudget"
#: How often the timer reconciles a budget (status, metrics, assignment heartbeat).
INTERVAL_SECONDS = 2.0
log = logging.getLogger(__name__)
WRITE_CONCURRENCY = 16
LEVEL_NAMES = {Level.NORMAL: "Normal", Level.T1: "T1", Level.T2: "T2"}


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


def telemetry_of(node: str, status: NodePowerStatus, priorities: Mapping[int, str]) -> list[GpuTelemetry]:
    """The policy's view of one node's report (empty when the agent has not reported)."""
    if status.sampled_at is None:
        return []
    at = status.sampled_at.timestamp()
    samples = []
    for g in status.gpus:
        if not 0 < g.min_limit_watts <= g.max_limit_watts:
            continue
        samples.append(
            GpuTelemetry(
                gpu=GpuId(node, g.index),
                power_watts=g.power_watts,
                limit_watts=g.limit_watts,
                min_limit_watts=g.min_limit_watts,
                max_limit_watts=g.max_limit_watts,
                priority=priorities.get(g.index, ""),
                timestamp=at,
            )
        )
    return samples


@dataclass
class Runtime:
    """What the operator keeps in memory for one budget between rounds."""

    name: str
    uid: str
    spec: PowerBudgetSpec
    budget: BudgetSpec
    nodes: dict[str, str] = field(default_factory=dict)  # node name -> Node uid
    priorities: dict[str, dict[int, str]] = field(default_factory=dict)
    state: PolicyState | None = None
    result: PolicyResult | None = None
    reporting: int = 0
    failsafe_nodes: list[str] = field(default_factory=list)
    written: dict[str, tuple[tuple[tuple[int, float, bool, str], ...], float]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dirty: bool = False
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> NodePower to write
    writers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)  # nodes whose NodePower this operator applied
    round_task: asyncio.Task[None] | None = None
    #: Writes in flight at once: enough to fill the API server, few enough that the client
    #: reuses its kept-alive connections instead of a TLS handshake per write.
    write_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(WRITE_CONCURRENCY))

    def close(self) -> None:
        for task in [*self.writers.values(), *([self.round_task] if self.round_task else [])]:
            task.cancel()

    def ref(self) -> kopf.Body:
        """Enough of the PowerBudget for kopf to post Events on it."""
        return kopf.Body(
            {
                "apiVersion": API_VERSION,
                "kind": POWER_BUDGET.kind,
                "metadata": {"name": self.name, "uid": self.uid},
            }
        )


#: Budgets by name, and the latest NodePower objects by node name (fed by the watch).
RUNTIMES: dict[str, Runtime] = {}
#: UIDs of deleted budgets, so that a reconcile racing the deletion does not resurrect them.
DELETED: set[str] = set()
NODE_POWERS: dict[str, dict[str, Any]] = {}


def _remember(obj: Mapping[str, Any]) -> None:
    """Cache a NodePower unless the cache already holds a newer version of it."""
    name = obj["metadata"]["name"]
    old = NODE_POWERS.get(name)
    with contextlib.suppress(KeyError, ValueError):
        if old is not None and int(old["metadata"]["resourceVersion"]) > int(
            obj["metadata"]["resourceVersion"]
        ):
            return
    NODE_POWERS[name] = dict(obj)


#: Parsed NodePower statuses by node, with the sampledAt they were parsed from (rounds run
#: far more often than any one node reports, so each report is parsed once).
_PARSED: dict[str, tuple[object, NodePowerStatus]] = {}
#: The report (sampledAt) of each node that last triggered a round.
_TRIGGERED: dict[str, object] = {}


def _status_of(node: str) -> NodePowerStatus:
    raw = (NODE_POWERS.get(node) or {}).get("status") or {}
    sampled = raw.get("sampledAt")
    cached = _PARSED.get(node)
    if cached is not None and sampled is not None and cached[0] == sampled:
        return cached[1]
    try:
        status = NodePowerStatus.model_validate(raw)
    except ValidationError:
        status = NodePowerStatus()
    _PARSED[node] = (sampled, status)
    return status


def _node_power(rt: Runtime, node: str, gpus: list[GpuAssignment], now: float) -> dict[str, Any]:
    spec = NodePowerSpec(
        budget=rt.name,
        gpus=gpus,
        assigned_at=datetime.fromtimestamp(now, UTC),
        safe_cap_watts=rt.spec.safe_cap_watts,
        staleness=rt.spec.telemetry_staleness,
    )
    return {
        "apiVersion": API_VERSION,
        "kind": NODE_POWER.kind,
        "metadata": {
            "name": node,
            "labels": {BUDGET_LABEL: rt.name},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": rt.nodes[node]}],
        },
        "spec": spec.to_api(),
    }


def _write_assignments(kube: Kube, rt: Runtime, now: float) -> None:
    """Queue each node's caps when they changed, or when the heartbeat (assignedAt) is due.

    One writer per node writes the newest queued NodePower (latest wins), so a round never
    waits for the API server: a surge seen by three rounds in a row costs each node at most
    one write in flight plus the newest one, not three.
    """
    by_node: dict[str, list[GpuAssignment]] = {node: [] for node in rt.nodes}
    if rt.result is not None:
        for a in rt.result.assignments:
            if a.gpu.node in by_node:
                name = rt.budget.priority_class(a.priority).name
                by_node[a.gpu.node].append(
                    GpuAssignment(index=a.gpu.index, cap_watts=a.cap_watts, capped=a.capped, priority=name)
                )
    if RUNTIMES.get(rt.name) is not rt:
        return  # the budget was deleted (or replaced) while this round ran
    heartbeat = rt.spec.telemetry_staleness / 3
    for node, gpus in by_node.items():
        key = tuple((g.index, g.cap_watts, g.capped, g.priority) for g in gpus)
        previous = rt.written.get(node)
        if previous is not None and previous[0] == key and now - previous[1] < heartbeat:
            continue
        rt.written[node] = (key, now)
        rt.pending[node] = _node_power(rt, node, gpus, now)
        if node not in rt.writers:
            rt.writers[node] = asyncio.create_task(_writer(kube, rt, node))


async def _writer(kube: Kube, rt: Runtime, node: str) -> None:
    try:
        while (obj := rt.pending.pop(node, None)) is not None:
            await rt.write_slots.acquire()
            obj = rt.pending.pop(node, obj)  # a newer assignment queued while waiting wins
            try:
                if RUNTIMES.get(rt.name) is not rt:
                    return  # never recreate the NodePowers of a deleted budget
                if node in rt.created:
                    patch = {"metadata": {"labels": obj["metadata"]["labels"]}, "spec": obj["spec"]}
                    written = await kube.patch(NODE_POWER.kind, None, node, patch)
                else:
                    written = await kube.apply(obj)
                    rt.created.add(node)
                _remember(written)
            except (KubeError, httpx.HTTPError) as error:
                if isinstance(error, KubeError) and error.status == 404:
                    rt.created.discard(node)
                rt.written.pop(node, None)  # the next round writes it again
                log.warning("writing NodePower %s failed: %s", node, error)
            finally:
                rt.write_slots.release()
    finally:
        rt.writers.pop(node, None)


async def _round(kube: Kube, rt: Runtime) -> None:
    """One policy round over the cached telemetry of the budget's nodes."""
    started = time.monotonic()
    now = time.time()
    telemetry: list[GpuTelemetry] = []
    reporting, failsafe = 0, []
    for node in sorted(rt.nodes):
        status = _status_of(node)
        samples = telemetry_of(node, status, rt.priorities.get(node, {}))
        if samples:
            telemetry.extend(samples)
            if now - samples[0].timestamp <= rt.budget.staleness_seconds:
                reporting += 1
        if status.failsafe:
            failsafe.append(node)
    rt.reporting, rt.failsafe_nodes = reporting, failsafe
    if telemetry:
        result = evaluate(rt.budget, telemetry, rt.state or PolicyState(), now)
        rt.state, rt.result = result.state, result
        _publish(rt, result)
    _write_assignments(kube, rt, now)
    metrics.POWER_BUDGET_ROUND_DURATION.observe(time.monotonic() - started)


def _publish(rt: Runtime, result: PolicyResult) -> None:
    summary = result.summary
    labels = ("", rt.name)
    metrics.POWER_BUDGET_POWER.labels(*labels).set(summary.total_watts)
    metrics.POWER_BUDGET_PEAK.labels(*labels).set(summary.peak_watts)
    metrics.POWER_BUDGET_HEADROOM.labels(*labels).set(summary.headroom_watts)
    metrics.POWER_BUDGET_CAPPED_GPUS.labels(*labels).set(summary.capped_gpus)
    metrics.POWER_BUDGET_LEVEL.labels(*labels).set(int(summary.level))
    for event in result.events:
        metrics.POWER_BUDGET_CROSSINGS.labels("", rt.name, event.kind.value).inc()
        warning = event.kind in (EventKind.ENTERED_T2, EventKind.LIMIT_EXCEEDED, EventKind.TELEMETRY_STALE)
        try:
            kopf.event(
                rt.ref(),
                type="Warning" if warning else "Normal",
                reason=event.kind.value,
                message=event.message,
            )
        except LookupError:  # outside kopf's context: log it rather than lose the round
            log.warning("%s: %s (no Event posted)", event.kind.value, event.message)


#: Pause between back-to-back rounds, so the watch can take in every report that arrived
#: during a round and the next round sees them all (a round over 800 GPUs takes ~50 ms).
ROUND_GAP_SECONDS = 0.01


async def run_rounds(kube: Kube, rt: Runtime) -> None:
    """Run rounds until no new telemetry is pending; reports arriving meanwhile are coalesced
    into the next round. A caller that finds rounds running leaves its report to them."""
    rt.dirty = True
    async with rt.lock:
        while rt.dirty:
            rt.dirty = False
            await _round(kube, rt)
            await asyncio.sleep(ROUND_GAP_SECONDS)


def trigger_rounds(kube: Kube, rt: Runtime) -> None:
    """Ask for a round without waiting for it (the watch must keep reading meanwhile)."""
    rt.dirty = True
    if rt.round_task is None or rt.round_task.done():
        rt.round_task = asyncio.create_task(run_rounds(kube, rt))


def _restore_state(raw: str) -> PolicyState | None:
    if not raw:
        return None
    try:
        return PolicyState.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        return None


async def reconcile(ctx: Context) -> None:
    spec: PowerBudgetSpec = ctx.spec
    kube = ctx.kube
    ensure_node_power_watch()
    nodes = await kube.list_objects("Node", None, label_selector(spec.node_selector))
    if str(ctx.body.metadata.uid) in DELETED:
        return  # a timer that fired as the budget was deleted
    rt = RUNTIMES.get(ctx.name)
    if rt is None or rt.uid != ctx.body.metadata.uid:
        rt = RUNTIMES[ctx.name] = Runtime(ctx.name, str(ctx.body.metadata.uid), spec, policy_budget(spec))
        rt.state = _restore_state(ctx.status.policy_state)
    rt.spec, rt.budget = spec, policy_budget(spec)

    # A node already assigned by another existing budget stays with it. Budgets that no longer
    # exist (their deletion was missed) lose their memory and their NodePowers.
    existing = {b["metadata"]["name"] for b in await kube.list_objects(POWER_BUDGET.kind, None)}
    for gone in [name for name in RUNTIMES if name not in existing]:
        RUNTIMES.pop(gone).close()
    node_powers = await kube.list_objects(NODE_POWER.kind, None)
    for obj in node_powers:
        _remember(obj)
    owner = {o["metadata"]["name"]: str(o.get("spec", {}).get("budget", "")) for o in node_powers}
    others = {n for n, b in owner.items() if b != ctx.name and b in existing}
    orphans = [
        n for n, b in owner.items() if b not in existing and n not in {x["metadata"]["name"] for x in nodes}
    ]
    for name in orphans:  # no budget covers the node any more: its agent restores full limits
        await kube.delete(NODE_POWER.kind, None, name)
        NODE_POWERS.pop(name, None)
    claimed = [n for n in nodes if n["metadata"]["name"] not in others]
    rt.nodes = {n["metadata"]["name"]: n["metadata"]["uid"] for n in claimed}
    gpus = sum(int(n.get("status", {}).get("capacity", {}).get(GPU_RESOURCE, 0)) for n in claimed)
    pods = await kube.list_objects("Pod", None, field_selector="status.phase=Running")
    rt.priorities = gpu_priorities(pods, set(rt.nodes), spec.default_priority_class)
    if str(ctx.body.metadata.uid) in DELETED:  # deleted while this reconcile listed
        if RUNTIMES.get(ctx.name) is rt:
            del RUNTIMES[ctx.name]
        rt.close()
        return

    await run_rounds(kube, rt)
    for name in await kube.prune("NodePower", "", f"{BUDGET_LABEL}={ctx.name}", keep=set(rt.nodes)):
        NODE_POWERS.pop(name, None)
        rt.written.pop(name, None)
        rt.created.discard(name)

    status = ctx.status
    status.nodes, status.gpus = len(rt.nodes), gpus
    status.reporting_nodes = rt.reporting
    status.failsafe_nodes = rt.failsafe_nodes
    metrics.POWER_BUDGET_LIMIT.labels("", ctx.name).set(spec.limit_watts)
    metrics.POWER_BUDGET_NODES.labels("", ctx.name).set(len(rt.nodes))
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
    shared = f"; {len(nodes) - len(claimed)} selected nodes belong to another budget" if others else ""
    if not nodes:
        ctx.set_ready(False, "NoNodesSelected", "the node selector matches no node")
    elif result is None:
        ctx.set_ready(
            False,
            "AwaitingTelemetry",
            f"{len(rt.nodes)} nodes with {gpus} GPUs selected; no node agent has reported power yet{shared}",
        )
    elif rt.reporting < len(rt.nodes):
        missing = len(rt.nodes) - rt.reporting
        ctx.set_ready(
            False,
            "TelemetryStale",
            f"{missing} of {len(rt.nodes)} nodes without fresh telemetry (stale GPUs count at their limits); "
            f"power {status.current_watts:.0f} W of {spec.limit_watts:.0f} W{shared}",
        )
    else:
        ctx.set_ready(
            True,
            "Enforcing",
            f"power {status.current_watts:.0f} W of {spec.limit_watts:.0f} W, level {status.level}, "
            f"{status.capped_gpus} GPUs capped{shared}",
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


async def _node_power_event(kube: Kube, kind: str, obj: dict[str, Any]) -> None:
    """A fresh agent report triggers a round of the budget that covers the node."""
    name = str(obj.get("metadata", {}).get("name", ""))
    if kind == "DELETED":
        NODE_POWERS.pop(name, None)
        _PARSED.pop(name, None)
        return
    _remember(obj)
    sampled = (obj.get("status") or {}).get("sampledAt")
    rt = RUNTIMES.get(str(obj.get("spec", {}).get("budget", "")))
    # Our own assignment writes come back through the watch too; only new reports count.
    if rt is None or name not in rt.nodes or sampled is None or _TRIGGERED.get(name) == sampled:
        return
    _TRIGGERED[name] = sampled
    trigger_rounds(kube, rt)


async def watch_node_powers(kube: Kube) -> None:
    """Feed NodePower events to the rounds, from a plain watch.

    Not a kopf handler on purpose: kopf's per-event machinery handles some tens of events a
    second on a small machine, and a surge on 100 nodes (100 reports, then the operator's own
    100 assignments) would queue behind it for seconds.
    """
    while True:
        try:
            items, version = await kube.list_with_version(NODE_POWER.kind, None)
            for obj in items:
                _remember(obj)
            async for event in kube.watch(NODE_POWER.kind, None, version):
                kind = str(event.get("type", ""))
                if kind == "ERROR":
                    break  # e.g. 410 Gone: relist
                if kind != "BOOKMARK":
                    await _node_power_event(kube, kind, event.get("object") or {})
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the API server restarted, a network blip: relist and go on
            log.warning("NodePower watch failed, restarting: %s", error)
            await asyncio.sleep(1)


_WATCH: list[tuple[Kube, asyncio.Task[None]]] = []


def ensure_node_power_watch() -> None:
    """Start the watch from inside a kopf handler, so that it inherits the context kopf posts
    Events through (a startup handler's context lacks it)."""
    if not _WATCH:
        kube = Kube()
        _WATCH.append((kube, asyncio.create_task(watch_node_powers(kube))))


@kopf.on.cleanup()
async def stop_node_power_watch(**_: Any) -> None:
    while _WATCH:
        kube, task = _WATCH.pop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await kube.close()


@kopf.on.delete(GROUP, VERSION, POWER_BUDGET.plural, id="release-nodes", optional=True)
async def release_nodes(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A deleted budget releases its nodes: their NodePowers go, and agents restore the limits."""
    name = str(body.metadata.name)
    DELETED.add(str(body.metadata.uid))
    rt = RUNTIMES.pop(name, None)
    if rt is not None:
        rt.close()
    for reason in EventKind:
        with contextlib.suppress(KeyError):
            metrics.POWER_BUDGET_CROSSINGS.remove("", name, reason.value)
    for node in await memo["kube"].prune("NodePower", "", f"{BUDGET_LABEL}={name}", keep=set()):
        NODE_POWERS.pop(node, None)


controller(POWER_BUDGET, reconcile, interval=INTERVAL_SECONDS)
