"""The operator-wide power runtime: NodePower watch, per-budget policy memory, cap writers.

One `PowerRuntime` is built at operator start-up (`controllers.settings`), kept in kopf's
memo and closed at cleanup. It holds what must outlive a single reconcile:

- the latest NodePower of every node, fed by the operator's read cache (its NodePower
  watch calls `node_power_event`; not a kopf handler: kopf's per-event machinery handles
  some tens of events a second on a small machine, and a surge on hundreds of nodes would
  queue behind it for seconds);
- per budget, the capping policy's memory and the writers of its nodes' assignments.

Telemetry comes two ways. The fast way: agents POST each sample to the operator's telemetry
endpoint (`controllers.powerbudget.endpoint`, `accept_report`), held here in memory and never
written to etcd; each node's assignment goes back in the answer, and changes are pushed at once
to the agent's open assignment stream (`assignment_changed`). The slow way: the NodePower status,
which agents write only on news beyond a deadband and on a long heartbeat (the durable,
`kubectl`-visible view; the only way for an agent that cannot reach the endpoint). A node's
telemetry is the fresher of the two.

A report that is news (`ampacity.power.reporting.ReportGate` on the operator's side: power beyond
the deadband, a limit, fault or pod map change) triggers a round of its budget at once (gather the
telemetry -> `ampacity.power.policy.evaluate` -> push and queue the changed assignments); a
sample that is no news only refreshes the node's freshness, so 500 agents reporting every second
do not run 500 rounds a second. NodePower specs are written on change, and refreshed
(`assignedAt`) only for nodes whose agent does not use the fast way: for the others, every
answer and stream message is the proof that the operator is alive. Rounds run in the context
of the first reconcile (`adopt_context`), because kopf posts Events only from within its
handlers' context.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import kopf
from pydantic import ValidationError

from ampacity.api import NODE_POWER, POWER_BUDGET
from ampacity.api.meta import API_VERSION, LABEL_PREFIX
from ampacity.api.nodepower import GpuAssignment, NodePowerSpec, NodePowerStatus
from ampacity.api.powerbudget import PowerBudgetSpec
from ampacity.kube import Kube, KubeError
from ampacity.power.budget import Actuator, BudgetSpec
from ampacity.power.gpu_model import clock_fraction_for_cap
from ampacity.power.policy import CapAssignment, EventKind, PolicyResult, PolicyState, evaluate
from ampacity.power.reporting import ReportGate, ReportPolicy
from ampacity.power.telemetry import GpuId, GpuTelemetry
from controllers import metrics, tokens
from controllers.cache import Informer

#: NodePowers carry the name of the budget that assigns them.
BUDGET_LABEL = f"{LABEL_PREFIX}/powerbudget"
#: Writes in flight at once: enough to fill the API server, few enough that the client reuses
#: its kept-alive connections instead of a TLS handshake per write.
WRITE_CONCURRENCY = 16
#: Pause between back-to-back rounds, so the watch can take in every report that arrived
#: during a round and the next round sees them all (a round over 800 GPUs takes ~50 ms).
ROUND_GAP_SECONDS = 0.01
#: How long a deleted budget's UID is remembered, so a reconcile racing the deletion does not
#: resurrect it (far longer than any reconcile).
DELETED_MEMORY_SECONDS = 300.0
#: Assignments are re-sent (refreshing assignedAt) every staleness * this, so agents tell a live
#: operator from a dead one. A third, not a half: a write can take seconds to land on a loaded
#: API server, and an agent whose assignment ages past the staleness fails safe.
HEARTBEAT_FRACTION = 1 / 3
#: A node whose agent has not reported for this many stalenesses gets no assignedAt refresh: its
#: agent, if any, writes its status at least every half staleness (`ReportPolicy`), so it is gone.
AGENT_SILENT_STALENESSES = 3
#: Which fast reports run a round: news only (power beyond the deadband, a limit, fault or pod map
#: change). No heartbeat: the budget's timer runs the rounds that only time calls for (staleness,
#: release windows), and 500 nodes' heartbeats would keep rounds running back to back.
ROUND_TRIGGER = ReportPolicy(offloaded_heartbeat_seconds=math.inf)
log = logging.getLogger(__name__)


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


def clock_lock(budget: BudgetSpec, a: CapAssignment) -> float | None:
    """The SM clock fraction a capped GPU is locked at under `ClockLock` (None: unlocked): where
    compute-bound work draws the cap, rounded up so that the power limit stays the exact bound."""
    if not a.capped or budget.actuator != Actuator.CLOCK_LOCK or a.max_watts <= 0:
        return None
    return min(1.0, math.ceil(clock_fraction_for_cap(a.cap_watts / a.max_watts) * 1000) / 1000)


@dataclass
class BudgetRuntime:
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
    #: Nodes whose agent could not apply what it had to: node -> the Enforcing condition's words.
    unenforced: dict[str, str] = field(default_factory=dict)
    #: GPU UUIDs each node reported last round (to notice a GPU disappearing).
    uuids: dict[str, dict[int, str]] = field(default_factory=dict)
    written: dict[str, tuple[tuple[Any, ...], float]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dirty: bool = False
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> NodePower to write
    writers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)  # nodes whose NodePower this operator applied
    round_task: asyncio.Task[None] | None = None
    heartbeat_task: asyncio.Task[None] | None = None
    write_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(WRITE_CONCURRENCY))
    #: node -> (assignment key, the NodePower spec without assignedAt): what the fast way answers.
    assigned: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)

    def close(self) -> None:
        own = [t for t in (self.round_task, self.heartbeat_task) if t is not None]
        for task in [*self.writers.values(), *own]:
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

    def event(self, reason: str, message: str, warning: bool) -> None:
        try:
            kopf.event(self.ref(), type="Warning" if warning else "Normal", reason=reason, message=message)
        except LookupError:  # outside kopf's context: log it rather than lose the round
            log.warning("%s: %s (no Event posted)", reason, message)


class PowerRuntime:
    """Operator-wide power state; see the module docstring."""

    def __init__(self, kube: Kube, node_powers: Informer | None = None) -> None:
        self.kube = kube
        self.budgets: dict[str, BudgetRuntime] = {}
        self.node_powers: dict[str, dict[str, Any]] = {}
        #: Parsed NodePower statuses by node, with the sampledAt they were parsed from.
        self._parsed: dict[str, tuple[object, NodePowerStatus]] = {}
        #: The report (sampledAt) of each node that last triggered a round.
        self._triggered: dict[str, object] = {}
        self._deleted: dict[str, float] = {}  # budget UID -> when it was deleted
        #: The fast way's latest report of each node, and when it arrived (wall clock).
        self._fast: dict[str, tuple[NodePowerStatus, float]] = {}
        #: Per node, whether a fast report is news enough to run a round.
        self._gates: dict[str, ReportGate] = {}
        #: Per node, an event set (and replaced) when the node's assignment changes.
        self._changed: dict[str, asyncio.Event] = {}
        self._context: contextvars.Context | None = None
        self._informer = node_powers
        if node_powers is not None:
            node_powers.listeners.append(self.node_power_event)

    # -- lifecycle --------------------------------------------------------------------------

    def adopt_context(self) -> None:
        """Run rounds in a kopf handler's context from now on, so they can post Events."""
        if self._context is None:
            self._context = contextvars.copy_context()

    async def close(self) -> None:
        if self._informer is not None and self.node_power_event in self._informer.listeners:
            self._informer.listeners.remove(self.node_power_event)
        for rt in self.budgets.values():
            rt.close()
        self.budgets.clear()

    def budget(self, name: str, uid: str, spec: PowerBudgetSpec, budget: BudgetSpec) -> BudgetRuntime | None:
        """The runtime of a live budget (None if it was deleted), created on first sight."""
        if self.was_deleted(uid):
            return None
        rt = self.budgets.get(name)
        if rt is None or rt.uid != uid:
            if rt is not None:
                rt.close()
            rt = self.budgets[name] = BudgetRuntime(name, uid, spec, budget)
            rt.heartbeat_task = asyncio.create_task(self._heartbeat(rt))
        rt.spec, rt.budget = spec, budget
        return rt

    def deleted(self, name: str, uid: str) -> None:
        now = time.monotonic()
        self._deleted = {u: t for u, t in self._deleted.items() if now - t < DELETED_MEMORY_SECONDS}
        self._deleted[uid] = now
        rt = self.budgets.get(name)
        if rt is not None and rt.uid == uid:
            del self.budgets[name]
            rt.close()
            for node in rt.nodes:
                self._notify(node)

    def was_deleted(self, uid: str) -> bool:
        return uid in self._deleted

    def forget_missing(self, existing: set[str]) -> None:
        """Budgets that no longer exist (their deletion was missed) lose their memory."""
        for gone in [name for name in self.budgets if name not in existing]:
            self.budgets.pop(gone).close()

    def forget_node(self, name: str) -> None:
        self.node_powers.pop(name, None)
        self._parsed.pop(name, None)
        self._triggered.pop(name, None)
        self._fast.pop(name, None)
        self._gates.pop(name, None)
        for rt in self.budgets.values():
            rt.written.pop(name, None)
            rt.assigned.pop(name, None)
            rt.created.discard(name)
        self._notify(name)

    # -- the NodePower cache ----------------------------------------------------------------

    def remember(self, obj: Mapping[str, Any]) -> None:
        """Cache a NodePower unless the cache already holds a newer version of it."""
        name = obj["metadata"]["name"]
        old = self.node_powers.get(name)
        with contextlib.suppress(KeyError, ValueError):
            if old is not None and int(old["metadata"]["resourceVersion"]) > int(
                obj["metadata"]["resourceVersion"]
            ):
                return
        self.node_powers[name] = dict(obj)

    def status_of(self, node: str) -> NodePowerStatus:
        """The node's telemetry: the fresher of its fast report and its NodePower status."""
        slow = self._slow_status(node)
        fast = self._fast[node][0] if node in self._fast else None
        if fast is None or fast.sampled_at is None:
            return slow
        return fast if slow.sampled_at is None or fast.sampled_at >= slow.sampled_at else slow

    def _slow_status(self, node: str) -> NodePowerStatus:
        raw = (self.node_powers.get(node) or {}).get("status") or {}
        sampled = raw.get("sampledAt")
        cached = self._parsed.get(node)
        if cached is not None and sampled is not None and cached[0] == sampled:
            return cached[1]
        try:
            status = NodePowerStatus.model_validate(raw)
        except ValidationError:
            status = NodePowerStatus()
        self._parsed[node] = (sampled, status)
        return status

    def node_power_event(self, kind: str, obj: dict[str, Any]) -> None:
        """A fresh agent report triggers a round of the budget that covers the node."""
        name = str(obj.get("metadata", {}).get("name", ""))
        if kind == "DELETED":
            self.node_powers.pop(name, None)
            self._parsed.pop(name, None)
            self._fast.pop(name, None)
            self._notify(name)
            return
        self.remember(obj)
        sampled = (obj.get("status") or {}).get("sampledAt")
        rt = self.budgets.get(str(obj.get("spec", {}).get("budget", "")))
        # Our own assignment writes come back through the watch too; only new reports count.
        if rt is None or name not in rt.nodes or sampled is None or self._triggered.get(name) == sampled:
            return
        self._triggered[name] = sampled
        self.trigger_rounds(rt)

    # -- the fast way -------------------------------------------------------------------------

    def budget_of(self, node: str) -> BudgetRuntime | None:
        """The live budget whose round covers `node` (None: under no budget the runtime knows)."""
        obj = self.node_powers.get(node)
        if obj is None:
            return None
        rt = self.budgets.get(str((obj.get("spec") or {}).get("budget", "")))
        return rt if rt is not None and node in rt.nodes else None

    def authorized(self, node: str, token: str) -> bool:
        """Whether `token` is the one whose hash the node's agent published in its NodePower
        status (only that agent may write it: the chart's admission policy)."""
        raw = ((self.node_powers.get(node) or {}).get("status") or {}).get("telemetryTokenHash", "")
        return tokens.matches_hash(token, str(raw))

    def accept_report(self, node: str, status: NodePowerStatus) -> None:
        """A fast report (already authorized): keep it; run a round if it is news."""
        now = time.time()
        if status.sampled_at is None:
            status.sampled_at = datetime.fromtimestamp(now, UTC)
        self._fast[node] = (status, now)
        rt = self.budget_of(node)
        if rt is None:
            return
        key = (
            status.failsafe,
            status.enforcing,
            tuple(status.faults),
            status.attribution,
            tuple((g.index, g.uuid, round(g.limit_watts), g.locked_clock_mhz, g.pod) for g in status.gpus),
        )
        gate = self._gates.setdefault(node, ReportGate(ROUND_TRIGGER))
        if gate.is_news(
            now,
            key,
            {str(g.index): g.power_watts for g in status.gpus},
            {str(g.index): g.max_limit_watts for g in status.gpus},
            rt.budget.staleness_seconds,
            offloaded=True,
        ):
            self.trigger_rounds(rt)

    def assignment(self, node: str) -> dict[str, Any]:
        """What the fast way answers: the node's NodePower generation and its assignment, with
        assignedAt now (the operator is alive); `spec` is None where no round assigned it yet."""
        obj = self.node_powers.get(node) or {}
        generation = int((obj.get("metadata") or {}).get("generation", 0) or 0)
        rt = self.budget_of(node)
        held = rt.assigned.get(node) if rt is not None else None
        if held is None:
            return {"generation": generation, "spec": None}
        spec = {**held[1], "assignedAt": datetime.now(UTC).isoformat()}
        return {"generation": generation, "spec": spec}

    def assignment_changed(self, node: str) -> asyncio.Event:
        """An event set when the node's assignment next changes (or its budget goes)."""
        event = self._changed.get(node)
        if event is None or event.is_set():
            event = self._changed[node] = asyncio.Event()
        return event

    def _notify(self, node: str) -> None:
        event = self._changed.pop(node, None)
        if event is not None:
            event.set()

    def _heard(self, node: str, now: float, within: float) -> bool:
        """Whether the node's agent reported (either way) within the last `within` seconds."""
        sampled = self.status_of(node).sampled_at
        return sampled is not None and now - sampled.timestamp() < within

    def _fast_fresh(self, node: str, now: float, within: float) -> bool:
        fast = self._fast.get(node)
        return fast is not None and now - fast[1] < within

    # -- rounds -------------------------------------------------------------------------------

    async def run_rounds(self, rt: BudgetRuntime) -> None:
        """Run rounds until no new telemetry is pending; reports arriving meanwhile are coalesced
        into the next round. A caller that finds rounds running leaves its report to them."""
        rt.dirty = True
        async with rt.lock:
            while rt.dirty:
                rt.dirty = False
                # Back-to-back rounds (a surge of news) leave the event loop at least as long as
                # they held it, so the fast reports and their answers keep flowing between rounds.
                await asyncio.sleep(max(ROUND_GAP_SECONDS, self._round(rt)))

    def trigger_rounds(self, rt: BudgetRuntime) -> None:
        """Ask for a round without waiting for it (the watch must keep reading meanwhile)."""
        rt.dirty = True
        if rt.round_task is None or rt.round_task.done():
            rt.round_task = asyncio.create_task(self.run_rounds(rt), context=self._context)

    def _round(self, rt: BudgetRuntime) -> float:
        """One policy round over the cached telemetry of the budget's nodes; returns its seconds."""
        started = time.monotonic()
        now = time.time()
        telemetry: list[GpuTelemetry] = []
        reporting, failsafe, unenforced = 0, [], {}
        for node in sorted(rt.nodes):
            status = self.status_of(node)
            samples = telemetry_of(node, status, rt.priorities.get(node, {}))
            fresh = (
                status.sampled_at is not None
                and now - status.sampled_at.timestamp() <= rt.budget.staleness_seconds
            )
            if samples:
                telemetry.extend(samples)
            if fresh:
                reporting += 1
                if not status.enforcing:
                    condition = status.condition("Enforcing")
                    unenforced[node] = (
                        f"{condition.reason}: {condition.message}"
                        if condition
                        else "the agent applies no caps"
                    )
            if status.failsafe:
                failsafe.append(node)
            self._notice_lost_gpus(rt, node, status)
        rt.reporting, rt.failsafe_nodes, rt.unenforced = reporting, failsafe, unenforced
        if telemetry:
            result = evaluate(rt.budget, telemetry, rt.state or PolicyState(), now)
            rt.state, rt.result = result.state, result
            self._publish(rt, result)
        self._write_assignments(rt, now)
        took = time.monotonic() - started
        metrics.POWER_BUDGET_ROUND_DURATION.observe(took)
        return took

    def _notice_lost_gpus(self, rt: BudgetRuntime, node: str, status: NodePowerStatus) -> None:
        # An agent whose NVML fails reports no GPUs: they are unreadable, not gone.
        if status.sampled_at is None or (not status.gpus and not status.enforcing):
            return
        now = {g.index: g.uuid for g in status.gpus if g.uuid}
        before = rt.uuids.get(node)
        rt.uuids[node] = now
        if before is None:
            return
        for index, uuid in sorted(before.items()):
            if uuid not in now.values():
                rt.event(
                    "GpuRemoved",
                    f"GPU {uuid} (index {index}) is gone from node {node}; dropped from the budget",
                    warning=True,
                )

    def _publish(self, rt: BudgetRuntime, result: PolicyResult) -> None:
        summary = result.summary
        labels = ("", rt.name)
        metrics.POWER_BUDGET_POWER.labels(*labels).set(summary.total_watts)
        metrics.POWER_BUDGET_PEAK.labels(*labels).set(summary.peak_watts)
        metrics.POWER_BUDGET_HEADROOM.labels(*labels).set(summary.headroom_watts)
        metrics.POWER_BUDGET_CAPPED_GPUS.labels(*labels).set(summary.capped_gpus)
        metrics.POWER_BUDGET_LEVEL.labels(*labels).set(int(summary.level))
        metrics.POWER_BUDGET_UNENFORCED_NODES.labels(*labels).set(len(rt.unenforced))
        for event in result.events:
            metrics.POWER_BUDGET_CROSSINGS.labels("", rt.name, event.kind.value).inc()
            warning = event.kind in (
                EventKind.ENTERED_T2,
                EventKind.LIMIT_EXCEEDED,
                EventKind.TELEMETRY_STALE,
                EventKind.LIMIT_BELOW_FLOORS,
            )
            rt.event(event.kind.value, event.message, warning)

    def _node_power(
        self, rt: BudgetRuntime, node: str, gpus: list[GpuAssignment], now: float
    ) -> dict[str, Any]:
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
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": node, "uid": rt.nodes[node]}
                ],
            },
            "spec": spec.to_api(),
        }

    async def _heartbeat(self, rt: BudgetRuntime) -> None:
        """Refresh assignments (assignedAt) on time whatever the reconcile timer and the reports
        do: with reports written only on news, rounds alone would leave agents to fail safe."""
        while self.budgets.get(rt.name) is rt:
            await asyncio.sleep(max(0.2, rt.spec.telemetry_staleness * HEARTBEAT_FRACTION / 5))
            if rt.result is not None:
                self._write_assignments(rt, time.time())

    def _write_assignments(self, rt: BudgetRuntime, now: float) -> None:
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
                    uuid = rt.uuids.get(a.gpu.node, {}).get(a.gpu.index, "")
                    by_node[a.gpu.node].append(
                        GpuAssignment(
                            index=a.gpu.index,
                            uuid=uuid,
                            cap_watts=a.cap_watts,
                            clock_fraction=clock_lock(rt.budget, a),
                            capped=a.capped,
                            priority=name,
                        )
                    )
        if self.budgets.get(rt.name) is not rt:
            return  # the budget was deleted (or replaced) while this round ran
        heartbeat = rt.spec.telemetry_staleness * HEARTBEAT_FRACTION
        for node, gpus in by_node.items():
            key = tuple((g.index, g.uuid, g.cap_watts, g.clock_fraction, g.capped, g.priority) for g in gpus)
            held = rt.assigned.get(node)
            if held is None or held[0] != key:
                obj = self._node_power(rt, node, gpus, now)
                spec = {k: v for k, v in obj["spec"].items() if k != "assignedAt"}
                rt.assigned[node] = (key, spec)
                self._notify(node)  # pushed to the agent's stream before any etcd write
            previous = rt.written.get(node)
            # Unchanged: assignedAt is refreshed only for agents that do not hear the fast way. An
            # agent's last fast answer stays valid for the staleness; after two heartbeats without
            # its reports the refresh goes out and has the last third to land, as on the slow way.
            # Nor for a node whose agent has not reported for AGENT_SILENT_STALENESSES stalenesses
            # (none runs, or it cannot reach the API server): nobody reads that assignedAt, and
            # 500 such nodes cost 150 writes a second. An agent that starts or comes back reports
            # first (its first sample is always news) and is refreshed from the next heartbeat on;
            # until then it holds its safe cap, failing closed.
            if (
                previous is not None
                and previous[0] == key
                and (
                    now - previous[1] < heartbeat
                    or self._fast_fresh(node, now, 2 * heartbeat)
                    or not self._heard(node, now, AGENT_SILENT_STALENESSES * rt.spec.telemetry_staleness)
                )
            ):
                continue
            rt.written[node] = (key, now)
            rt.pending[node] = self._node_power(rt, node, gpus, now)
            if node not in rt.writers:
                rt.writers[node] = asyncio.create_task(self._writer(rt, node))

    async def _writer(self, rt: BudgetRuntime, node: str) -> None:
        try:
            while (obj := rt.pending.pop(node, None)) is not None:
                await rt.write_slots.acquire()
                obj = rt.pending.pop(node, obj)  # a newer assignment queued while waiting wins
                try:
                    if self.budgets.get(rt.name) is not rt:
                        return  # never recreate the NodePowers of a deleted budget
                    if node in rt.created:
                        patch = {"metadata": {"labels": obj["metadata"]["labels"]}, "spec": obj["spec"]}
                        written = await self.kube.patch(NODE_POWER.kind, None, node, patch)
                    else:
                        written = await self.kube.apply(obj)
                        rt.created.add(node)
                    self.remember(written)
                except (KubeError, httpx.HTTPError) as error:
                    if isinstance(error, KubeError) and error.status == 404:
                        rt.created.discard(node)
                    rt.written.pop(node, None)  # the next round writes it again
                    log.warning("writing NodePower %s failed: %s", node, error)
                finally:
                    rt.write_slots.release()
        finally:
            rt.writers.pop(node, None)
