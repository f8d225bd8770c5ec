"""The node agent's control loop: read the GPUs, enforce the node's assignment, report.

Every round the agent takes its node's assignment (the caps and clock locks the operator
assigned): from the operator's power telemetry endpoint when it has one (`--operator-url`:
`agents.operator_link`, the answer to the sample it sends there, or a change pushed on the
assignment stream, which wakes the loop at once), else from its NodePower on the API server.
It decides each GPU's limit with `ampacity.power.failsafe.failsafe_cap` (the
assignment while it is fresh and the API server answers, the budget's safe cap otherwise),
sets what changed, reads power, limits, clocks and energy, asks the kubelet which pod holds
each GPU, and reports. A node without a NodePower is under no budget: the agent gives back
the GPUs it changed (their starting limit, clocks unlocked) and reports metrics only.

It fails closed: when NVML is missing or refuses a setting (NoPermission, NotSupported), the
status says `enforcing: false` with the NVML error in the `Enforcing` condition, a metric
counts it, and the reported limits are the ones read back from the GPU, never the ones asked
for. Reports are written when something changed (power beyond a deadband, a limit or clock
taking effect, a fault, the pod map) and otherwise on a heartbeat, so a quiet row costs the
API server one write per node every `staleness / 2` (every 60 s when the samples reach the
operator the fast way: the status is then the slow, durable view).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from agents.gpu import GpuBackend, GpuError, GpuInfo, SimulatedFaults, SimulatedGpuBackend, release
from agents.metrics import AgentMetrics, GpuSample
from agents.operator_link import LinkError, OperatorLink
from agents.pod_resources import PodRef, PodResourcesClient, PodResourcesError
from ampacity.api.meta import ConditionStatus
from ampacity.api.nodepower import (
    GpuAssignment,
    GpuReading,
    NodePowerSpec,
    NodePowerStatus,
    PodResourcesState,
)
from ampacity.kube import Kube, KubeError
from ampacity.power.budget import BudgetSpec, PriorityClass
from ampacity.power.failsafe import CapDecision, failsafe_cap
from ampacity.power.reporting import ReportGate, ReportPolicy

log = logging.getLogger("ampacity.agent")

#: Limits closer than this are the same limit (NVML works in milliwatts, specs in watts).
LIMIT_TOLERANCE_WATTS = 1.0
#: How often the agent retries opening a backend that failed to open (NVML missing).
REOPEN_SECONDS = 10.0


@dataclass(frozen=True)
class RoundResult:
    """What one round did, for logs and tests."""

    under_budget: bool
    api_reachable: bool
    failsafe: bool
    reason: str
    limits: tuple[float, ...]
    enforcing: bool = True
    reported: bool = False


@dataclass
class _Round:
    """What a round found, gathered before it is reported."""

    gpus: list[GpuInfo] = field(default_factory=list)
    readings: list[GpuReading] = field(default_factory=list)
    faults: list[GpuError] = field(default_factory=list)


def _failsafe_budget(spec: NodePowerSpec) -> BudgetSpec:
    """The part of a budget `failsafe_cap` reads (staleness and safe cap), from the node's spec."""
    return BudgetSpec(
        limit_watts=1.0,
        classes=(PriorityClass("any", 0, 1.0),),
        staleness_seconds=max(spec.staleness, 1e-3),
        safe_cap_watts=spec.safe_cap_watts,
    )


def _assignment_for(spec: NodePowerSpec, gpu: GpuInfo) -> GpuAssignment | None:
    """The operator's assignment for a GPU: by UUID when it names one, else by index."""
    for a in spec.gpus:
        if a.uuid == gpu.uuid or (not a.uuid and a.index == gpu.index):
            return a
    return None


def _newer(a: NodePowerSpec, b: NodePowerSpec) -> bool:
    return a.assigned_at is not None and (b.assigned_at is None or a.assigned_at > b.assigned_at)


async def _first(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    """Wait until `stop` or `wake` is set, or `seconds` have passed."""
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(wake.wait())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()


class Agent:
    """One node's agent. `clock` is wall-clock seconds (assignments carry RFC 3339 times).

    Without a `backend`, `open_backend` opens one; when that fails (NVML missing) the agent
    keeps running, reports why it cannot enforce, and retries every `REOPEN_SECONDS`.
    """

    def __init__(
        self,
        node: str,
        backend: GpuBackend | None,
        kube: Kube,
        metrics: AgentMetrics | None = None,
        clock: Callable[[], float] = time.time,
        before_round: Callable[[], None] | None = None,
        pod_resources: PodResourcesClient | None = None,
        report_policy: ReportPolicy | None = None,
        open_backend: Callable[[], GpuBackend] | None = None,
        link: OperatorLink | None = None,
    ) -> None:
        self.node = node
        self.before_round = before_round
        self.backend = backend
        self._open = open_backend
        self.kube = kube
        self.metrics = metrics or AgentMetrics(node)
        self.clock = clock
        self.pod_resources = pod_resources
        self.reports = ReportGate(report_policy or ReportPolicy())
        self.backend_name = self.backend.name if self.backend is not None else "nvml"
        self._open_error: GpuError | None = None
        self._opened_at = -float("inf")
        self._spec: NodePowerSpec | None = None  # the last assignment read
        self._status = NodePowerStatus()
        self._touched: dict[str, GpuInfo] = {}  # GPUs this agent changed, as found at start
        self._locked: dict[str, int] = {}  # UUID -> SM clock lock this agent set
        self._known: dict[str, GpuInfo] = {}
        self._pods: dict[str, PodRef] = {}
        self._attribution = PodResourcesState.DISABLED
        self.link = link
        #: Set when the operator pushes a changed assignment: the loop runs a round at once.
        self.wake = asyncio.Event()

    # -- gather ---------------------------------------------------------------------------

    def _backend(self) -> GpuBackend | GpuError:
        if self.backend is not None:
            return self.backend
        if self._open is None or (self._open_error and time.monotonic() - self._opened_at < REOPEN_SECONDS):
            return self._open_error or GpuError("Uninitialized", "open", "no backend")
        self._opened_at = time.monotonic()
        try:
            self.backend = self._open()
        except GpuError as error:
            if self._open_error is None or self._open_error.code != error.code:
                log.error("cannot open NVML on %s: %s; nothing will be capped", self.node, error)
            self._open_error = error
            return error
        self.backend_name, self._open_error = self.backend.name, None
        log.info("NVML opened on %s", self.node)
        return self.backend

    async def _take_assignment(self) -> tuple[bool, int | None]:
        """(API reachable, the NodePower's generation or None when the node has none): the
        operator's fast answer while it is fresh, else the NodePower from the API server."""
        fast = self.link.latest if self.link is not None else None
        spec = fast.spec if fast is not None else None
        at = spec.assigned_at if spec is not None else None
        if (
            fast is not None
            and spec is not None
            and at is not None
            and self.clock() - at.timestamp() <= spec.staleness
        ):
            self._spec = spec
            return True, fast.generation
        reachable, obj = await self._read_assignment()
        if obj is None:
            return reachable, None
        # The last fast answer, if newer than the stored spec, still says the operator was alive.
        if spec is not None and self._spec is not None and _newer(spec, self._spec):
            self._spec = spec
        return reachable, int(obj.get("metadata", {}).get("generation", 0))

    async def _read_assignment(self) -> tuple[bool, dict[str, Any] | None]:
        """(API reachable, the NodePower or None). Keeps the last spec when unreachable."""
        try:
            obj = await self.kube.get("NodePower", None, self.node)
        except (httpx.HTTPError, KubeError) as error:
            self.metrics.api_errors += 1
            log.warning("cannot read NodePower %s: %s", self.node, error)
            return False, None
        if obj is None:
            self._spec = None
            return True, None
        try:
            self._spec = NodePowerSpec.model_validate(obj.get("spec") or {})
        except ValidationError as error:
            log.warning("unreadable NodePower spec, keeping the last one: %s", error)
        return True, obj

    def _list_gpus(self, backend: GpuBackend, found: _Round) -> None:
        try:
            found.gpus = backend.gpus()
        except GpuError as error:
            found.faults.append(error)
            return
        present = {g.uuid for g in found.gpus}
        for uuid in [u for u in self._known if u not in present]:
            log.warning("GPU %s is gone from %s; dropped from the report", uuid, self.node)
            self.metrics.gpus_lost += 1
            self._touched.pop(uuid, None)
            self._locked.pop(uuid, None)
            del self._known[uuid]
        for gpu in found.gpus:
            self._known.setdefault(gpu.uuid, gpu)

    async def _attribute(self) -> None:
        if self.pod_resources is None:
            self._attribution = PodResourcesState.DISABLED
            return
        try:
            self._pods = await self.pod_resources.gpu_pods()
            self._attribution = PodResourcesState.KUBELET
        except PodResourcesError as error:
            if self._attribution != PodResourcesState.UNAVAILABLE:
                log.warning("kubelet pod-resources API unavailable: %s", error)
            self._attribution = PodResourcesState.UNAVAILABLE
            self._pods = {}

    # -- decide ---------------------------------------------------------------------------

    def _decide(self, spec: NodePowerSpec, gpus: list[GpuInfo], reachable: bool) -> list[CapDecision]:
        budget = _failsafe_budget(spec)
        assigned_at = spec.assigned_at.timestamp() if spec.assigned_at else None
        now = self.clock()
        decisions = []
        for gpu in gpus:
            assignment = _assignment_for(spec, gpu)
            # A fresh assignment that does not list a GPU leaves it uncapped.
            cap = (assignment.cap_watts if assignment else gpu.max_limit_watts) if assigned_at else None
            decisions.append(
                failsafe_cap(
                    budget,
                    assigned_cap_watts=cap,
                    assigned_at=assigned_at,
                    now=now,
                    api_reachable=reachable,
                    min_limit_watts=gpu.min_limit_watts,
                    max_limit_watts=gpu.max_limit_watts,
                    total_gpus=None,
                )
            )
        return decisions

    # -- act ------------------------------------------------------------------------------

    def _enforce(
        self,
        backend: GpuBackend,
        spec: NodePowerSpec,
        gpus: list[GpuInfo],
        decisions: list[CapDecision],
        found: _Round,
    ) -> None:
        for gpu, decision in zip(gpus, decisions, strict=True):
            try:
                self._enforce_clock(backend, spec, gpu, decision)
                if abs(backend.read(gpu.uuid).limit_watts - decision.cap_watts) >= LIMIT_TOLERANCE_WATTS:
                    self._touched.setdefault(gpu.uuid, gpu)
                    backend.set_power_limit(gpu.uuid, decision.cap_watts)
                    self.metrics.cap_changed(gpu.index)
            except GpuError as error:
                found.faults.append(error)

    def _enforce_clock(
        self, backend: GpuBackend, spec: NodePowerSpec, gpu: GpuInfo, decision: CapDecision
    ) -> None:
        """Clock locks hold only under a fresh assignment; in fail-safe the watt cap governs."""
        assignment = _assignment_for(spec, gpu)
        fraction = assignment.clock_fraction if assignment is not None and not decision.failsafe else None
        want = None
        if fraction is not None and gpu.max_clock_mhz is not None:
            # Rounded up, so the power limit (set to the cap too) stays the exact bound.
            want = max(gpu.min_clock_mhz or 0, math.ceil(gpu.max_clock_mhz * fraction))
        if self._locked.get(gpu.uuid) == want:
            return
        self._touched.setdefault(gpu.uuid, gpu)
        if want is None:
            backend.reset_clocks(gpu.uuid)
            self._locked.pop(gpu.uuid, None)
        else:
            backend.lock_clocks(gpu.uuid, want)
            self._locked[gpu.uuid] = want

    def _release(self, backend: GpuBackend, found: _Round) -> None:
        """The node left its budget (NodePower deleted): give back what this agent changed."""
        for uuid, gpu in list(self._touched.items()):
            try:
                release(backend, gpu)
            except GpuError as error:
                found.faults.append(error)
                continue
            self.metrics.cap_changed(gpu.index)
            self._locked.pop(uuid, None)
            del self._touched[uuid]
        if not self._touched:
            log.info("%s is under no PowerBudget: GPUs back at the limits they had at start", self.node)

    def _sample(self, backend: GpuBackend, found: _Round) -> list[GpuReading]:
        readings = []
        present = []
        for gpu in found.gpus:
            try:
                r = backend.read(gpu.uuid)
            except GpuError as error:
                if not error.gone:
                    found.faults.append(error)
                continue  # a GPU that cannot be read is not reported as if it were fine
            present.append(gpu)
            pod = self._pods.get(gpu.uuid)
            readings.append(
                GpuReading(
                    index=gpu.index,
                    uuid=gpu.uuid,
                    model=gpu.model,
                    power_watts=max(0.0, r.power_watts),
                    energy_joules=r.energy_joules,
                    limit_watts=r.limit_watts,
                    min_limit_watts=gpu.min_limit_watts,
                    max_limit_watts=gpu.max_limit_watts,
                    default_limit_watts=gpu.default_limit_watts,
                    clock_mhz=r.clock_mhz,
                    locked_clock_mhz=self._locked.get(gpu.uuid),
                    pod=str(pod) if pod else "",
                )
            )
        found.gpus = present
        return readings

    async def step(self) -> RoundResult:
        """One round: read the assignment, enforce it (or the safe cap), sample, report."""
        if self.before_round is not None:
            self.before_round()
        reachable, generation = await self._take_assignment()
        spec = self._spec
        found = _Round()
        failsafe, reason = False, ""
        backend = self._backend()
        if isinstance(backend, GpuError):
            found.faults.append(backend)
        else:
            self._list_gpus(backend, found)
            if spec is not None and found.gpus:
                decisions = self._decide(spec, found.gpus, reachable)
                self._enforce(backend, spec, found.gpus, decisions, found)
                reasons = sorted({d.reason for d in decisions if d.failsafe})
                failsafe, reason = bool(reasons), "; ".join(reasons)
            elif spec is None and self._touched:
                self._release(backend, found)
            await self._attribute()
            found.readings = self._sample(backend, found)
        enforcing = not found.faults
        for fault in found.faults:
            self.metrics.nvml_error(fault.reason)
        was_failsafe = self.metrics.failsafe
        self.metrics.record(
            [
                GpuSample(
                    r.index, r.power_watts, r.energy_joules, r.limit_watts, r.uuid, r.model, r.clock_mhz
                )
                for r in found.readings
            ],
            failsafe,
            enforcing,
        )
        if failsafe and not was_failsafe:
            log.warning("fail-safe: enforcing the safe cap on %s (%s)", self.node, reason)
        elif was_failsafe and not failsafe:
            log.info("fail-safe over: enforcing the operator's assignment on %s", self.node)
        reported = False
        if generation is not None:
            reported = await self._report(generation, found, failsafe, reason)
        return RoundResult(
            under_budget=spec is not None,
            api_reachable=reachable,
            failsafe=failsafe,
            reason=reason,
            limits=tuple(r.limit_watts for r in found.readings),
            enforcing=enforcing,
            reported=reported,
        )

    # -- report ---------------------------------------------------------------------------

    def _is_news(
        self, spec: NodePowerSpec | None, status: NodePowerStatus, now: float, offloaded: bool
    ) -> bool:
        key = (
            status.observed_generation,
            status.failsafe,
            status.failsafe_reason,
            status.enforcing,
            tuple(status.faults),
            status.attribution,
            status.telemetry_token_hash,
            tuple((g.uuid, round(g.limit_watts), g.locked_clock_mhz, g.pod) for g in status.gpus),
        )
        return self.reports.is_news(
            now,
            key,
            {g.uuid: g.power_watts for g in status.gpus},
            {g.uuid: g.max_limit_watts for g in status.gpus},
            spec.staleness if spec is not None else None,
            offloaded,
        )

    async def _report(self, generation: int, found: _Round, failsafe: bool, reason: str) -> bool:
        """Send the sample the fast way (when linked), and write the status where it is news."""
        status = self._status
        now = self.clock()
        status.sampled_at = datetime.fromtimestamp(now, UTC)
        status.power_watts = round(sum(r.power_watts for r in found.readings), 3)
        status.gpus = found.readings
        status.failsafe, status.failsafe_reason = failsafe, reason
        status.backend = self.backend_name
        status.enforcing = not found.faults
        status.faults = [str(f) for f in found.faults]
        status.attribution = self._attribution
        status.telemetry_token_hash = self.link.token_hash if self.link is not None else ""
        status.observed_generation = generation
        if found.faults:
            first = found.faults[0]
            more = f" (and {len(found.faults) - 1} more)" if len(found.faults) > 1 else ""
            message = f"caps are not applied: {first}{more}"
            status.set_condition("Enforcing", ConditionStatus.FALSE, first.reason, message, generation)
            status.set_condition("Ready", ConditionStatus.FALSE, "NotEnforcing", message, generation)
        else:
            status.set_condition(
                "Enforcing",
                ConditionStatus.TRUE,
                "Applied",
                "every limit and clock lock took effect",
                generation,
            )
            if failsafe:
                status.set_condition(
                    "Ready",
                    ConditionStatus.FALSE,
                    "Failsafe",
                    f"enforcing the safe cap: {reason}",
                    generation,
                )
            else:
                status.set_condition(
                    "Ready",
                    ConditionStatus.TRUE,
                    "Enforcing",
                    "enforcing the operator's assignment",
                    generation,
                )
        offloaded = False
        if self.link is not None:
            try:
                await self.link.report(status, self.wake.set)
                offloaded = True
                self.metrics.fast_reports += 1
            except LinkError:  # the link logged it; the status below is the way this round
                self.metrics.fast_failures += 1
        if not self._is_news(self._spec, status, now, offloaded):
            return False
        try:
            await self.kube.patch_status("NodePower", None, self.node, status.to_api())
        except (httpx.HTTPError, KubeError) as error:
            self.metrics.api_errors += 1
            self.reports.failed()  # the next round tries again
            log.warning("cannot report NodePower %s status: %s", self.node, error)
            return False
        self.metrics.status_writes += 1
        return True

    async def run(self, interval: float, stop: asyncio.Event | None = None) -> None:
        """Run rounds every `interval` seconds until `stop` is set."""
        stop = stop or asyncio.Event()
        follower = (
            asyncio.create_task(self.link.follow(self.wake.set, stop)) if self.link is not None else None
        )
        try:
            while not stop.is_set():
                started = time.monotonic()
                self.wake.clear()
                try:
                    await self.step()
                except Exception:  # one bad round must not stop enforcement
                    log.exception("agent round failed")
                remaining = interval - (time.monotonic() - started)
                if remaining > 0 and not self.wake.is_set():
                    await _first(stop, self.wake, remaining)
        finally:
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


class LoadFile:
    """Load (and faults) for a simulated backend, read from a JSON file whenever it changes.

    `{"prompt": 0.9, "token": 0.0, "gpus": {"3": {"prompt": 0.1}}, "nvml": "LibraryNotFound",
    "setLimit": "NoPermission"}`: busy fractions for every GPU, optionally overridden per GPU
    index; `nvml` makes every NVML call fail with that error (the library is missing),
    `setLimit` makes setting limits and clocks fail. Tests and demos rewrite it.
    """

    def __init__(self, path: Path, backend: SimulatedGpuBackend) -> None:
        self.path = path
        self.backend = backend
        self._seen: float | None = None

    def refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._seen:
            return
        try:
            load = json.loads(self.path.read_text())
        except ValueError:
            return  # caught mid-write; the next round reads it
        self._seen = mtime
        self.backend.faults = SimulatedFaults(str(load.get("nvml", "")), str(load.get("setLimit", "")))
        per_gpu = load.get("gpus", {})
        for index in range(self.backend.device_count()):
            gpu = {**load, **per_gpu.get(str(index), {})}
            self.backend.set_load(index, float(gpu.get("prompt", 0.0)), float(gpu.get("token", 0.0)))
