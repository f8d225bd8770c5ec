"""The node agent's control loop: read the GPUs, enforce the node's assignment, report.

Every round the agent reads its node's NodePower (the caps the operator assigned),
decides each GPU's limit with `ampacity.power.failsafe.failsafe_cap` (the assignment
while it is fresh and the API server answers, the budget's safe cap otherwise), sets the
limits that changed, samples power, limits and energy, and writes them to the NodePower
status. A node without a NodePower is under no budget: the agent reports metrics only and
leaves its GPUs alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from agents.gpu import GpuBackend, SimulatedGpuBackend
from agents.metrics import AgentMetrics, GpuSample
from ampacity.api.meta import ConditionStatus
from ampacity.api.nodepower import GpuReading, NodePowerSpec, NodePowerStatus
from ampacity.kube import Kube, KubeError
from ampacity.power.budget import BudgetSpec, PriorityClass
from ampacity.power.failsafe import CapDecision, failsafe_cap

log = logging.getLogger("ampacity.agent")

#: Limits closer than this are the same limit (NVML works in milliwatts, specs in watts).
LIMIT_TOLERANCE_WATTS = 1.0


@dataclass(frozen=True)
class RoundResult:
    """What one round did, for logs and tests."""

    under_budget: bool
    api_reachable: bool
    failsafe: bool
    reason: str
    limits: tuple[float, ...]


def _failsafe_budget(spec: NodePowerSpec) -> BudgetSpec:
    """The part of a budget `failsafe_cap` reads (staleness and safe cap), from the node's spec."""
    return BudgetSpec(
        limit_watts=1.0,
        classes=(PriorityClass("any", 0, 1.0),),
        staleness_seconds=max(spec.staleness, 1e-3),
        safe_cap_watts=spec.safe_cap_watts,
    )


class Agent:
    """One node's agent. `clock` is wall-clock seconds (assignments carry RFC 3339 times)."""

    def __init__(
        self,
        node: str,
        backend: GpuBackend,
        kube: Kube,
        metrics: AgentMetrics | None = None,
        backend_name: str = "nvml",
        clock: Callable[[], float] = time.time,
        before_round: Callable[[], None] | None = None,
    ) -> None:
        self.node = node
        self.before_round = before_round
        self.backend = backend
        self.kube = kube
        self.metrics = metrics or AgentMetrics(node)
        self.backend_name = backend_name
        self.clock = clock
        self._spec: NodePowerSpec | None = None  # the last assignment read
        self._status = NodePowerStatus()
        self._touched: set[int] = set()  # GPUs whose limit this agent changed

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

    def _decide(self, spec: NodePowerSpec, reachable: bool) -> list[CapDecision]:
        budget = _failsafe_budget(spec)
        assigned = {g.index: g.cap_watts for g in spec.gpus}
        assigned_at = spec.assigned_at.timestamp() if spec.assigned_at else None
        now = self.clock()
        decisions = []
        for index in range(self.backend.device_count()):
            low, high = self.backend.limit_range_watts(index)
            # A fresh assignment that does not list a GPU leaves it uncapped.
            cap = assigned.get(index, high) if assigned_at is not None else None
            decisions.append(
                failsafe_cap(
                    budget,
                    assigned_cap_watts=cap,
                    assigned_at=assigned_at,
                    now=now,
                    api_reachable=reachable,
                    min_limit_watts=low,
                    max_limit_watts=high,
                    total_gpus=None,
                )
            )
        return decisions

    def _enforce(self, decisions: list[CapDecision]) -> None:
        for index, decision in enumerate(decisions):
            if abs(self.backend.power_limit_watts(index) - decision.cap_watts) >= LIMIT_TOLERANCE_WATTS:
                self.backend.set_power_limit_watts(index, decision.cap_watts)
                self.metrics.cap_changed(index)
                self._touched.add(index)

    def _release(self) -> None:
        """The node left its budget (NodePower deleted): give back the limits this agent set."""
        for index in sorted(self._touched):
            high = self.backend.limit_range_watts(index)[1]
            if abs(self.backend.power_limit_watts(index) - high) >= LIMIT_TOLERANCE_WATTS:
                self.backend.set_power_limit_watts(index, high)
                self.metrics.cap_changed(index)
        log.info("%s is under no PowerBudget: GPU limits restored to their maximum", self.node)
        self._touched.clear()

    def _sample(self) -> list[GpuReading]:
        readings = []
        for index in range(self.backend.device_count()):
            low, high = self.backend.limit_range_watts(index)
            readings.append(
                GpuReading(
                    index=index,
                    power_watts=self.backend.power_watts(index),
                    energy_joules=self.backend.energy_joules(index),
                    limit_watts=self.backend.power_limit_watts(index),
                    min_limit_watts=low,
                    max_limit_watts=high,
                )
            )
        return readings

    async def step(self) -> RoundResult:
        """One round: read the assignment, enforce it (or the safe cap), sample, report."""
        if self.before_round is not None:
            self.before_round()
        reachable, obj = await self._read_assignment()
        spec = self._spec
        failsafe, reason = False, ""
        if spec is not None:
            decisions = self._decide(spec, reachable)
            self._enforce(decisions)
            reasons = sorted({d.reason for d in decisions if d.failsafe})
            failsafe, reason = bool(reasons), "; ".join(reasons)
        elif self._touched:
            self._release()
        readings = self._sample()
        was_failsafe = self.metrics.failsafe
        self.metrics.record(
            [GpuSample(r.index, r.power_watts, r.energy_joules, r.limit_watts) for r in readings], failsafe
        )
        if failsafe and not was_failsafe:
            log.warning("fail-safe: enforcing the safe cap on %s (%s)", self.node, reason)
        elif was_failsafe and not failsafe:
            log.info("fail-safe over: enforcing the operator's assignment on %s", self.node)
        if obj is not None:
            await self._report(obj, readings, failsafe, reason)
        return RoundResult(
            under_budget=spec is not None,
            api_reachable=reachable,
            failsafe=failsafe,
            reason=reason,
            limits=tuple(r.limit_watts for r in readings),
        )

    async def _report(
        self, obj: dict[str, Any], readings: list[GpuReading], failsafe: bool, reason: str
    ) -> None:
        status = self._status
        status.sampled_at = datetime.fromtimestamp(self.clock(), UTC)
        status.power_watts = round(sum(r.power_watts for r in readings), 3)
        status.gpus = readings
        status.failsafe, status.failsafe_reason = failsafe, reason
        status.backend = self.backend_name
        generation = int(obj.get("metadata", {}).get("generation", 0))
        status.observed_generation = generation
        if failsafe:
            status.set_condition(
                "Ready", ConditionStatus.FALSE, "Failsafe", f"enforcing the safe cap: {reason}", generation
            )
        else:
            status.set_condition(
                "Ready", ConditionStatus.TRUE, "Enforcing", "enforcing the operator's assignment", generation
            )
        try:
            await self.kube.patch_status("NodePower", None, self.node, status.to_api())
        except (httpx.HTTPError, KubeError) as error:
            self.metrics.api_errors += 1
            log.warning("cannot report NodePower %s status: %s", self.node, error)

    async def run(self, interval: float, stop: asyncio.Event | None = None) -> None:
        """Run rounds every `interval` seconds until `stop` is set."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.step()
            except Exception:  # one bad round (a GPU read error) must not stop enforcement
                log.exception("agent round failed")
            remaining = interval - (time.monotonic() - started)
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), remaining)


class LoadFile:
    """Load for a simulated backend, read from a JSON file whenever it changes.

    `{"prompt": 0.9, "token": 0.0, "gpus": {"3": {"prompt": 0.1}}}`: busy fractions for every
    GPU, optionally overridden per GPU index. Tests and demos drive power by rewriting it.
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
        per_gpu = load.get("gpus", {})
        for index in range(self.backend.device_count()):
            gpu = {**load, **per_gpu.get(str(index), {})}
            self.backend.set_load(index, float(gpu.get("prompt", 0.0)), float(gpu.get("token", 0.0)))
