"""The capping policy: telemetry + budget + priorities + previous state -> per-GPU caps.

POLCA (Patel et al., "Characterizing Power Management Opportunities for LLMs in the
Cloud", ASPLOS 2024) oversubscribes a row by reacting at two thresholds: above T1 it caps
low-priority work, above T2 it caps everything, braking hardest on the lowest priority.
This module is that reaction as one pure function, `evaluate`, so the controller can run
it on each telemetry round and tests can drive it without a cluster.

Planning uses *projected* power: each GPU's sample, lowered to the cap already assigned
to it (caps written last round may not have reached the agent yet, and counting their
full draw twice would over-brake). A GPU whose sample is older than the budget allows
counts at max(sample, enforced limit): if we cannot see it, assume it runs flat out.

Caps tighten as soon as power is above a threshold. They loosen step by step, highest
priority first, once projected power averaged over a `hold_seconds` window has stayed
`hysteresis_fraction` below the threshold, and only into headroom the whole window left
unused (below its peak) even if every raised GPU jumped to its new cap; that is what keeps
the loop from flapping and from releasing into the next inference burst. The window
average (rather than every sample) matters on inference rows: their power swings by
several percent within seconds, and a rule that any one sample resets would leave
low-priority work at its floor long after the row has room for it.

The protected tier has one more way up. Its caps were set in a burst from what each GPU drew
then; a GPU that was decoding got a cap it does not feel (memory-bound), and one that starts
prompts later is slowed by it while the rest of the row may be far from T2. So each round,
capped protected GPUs whose draw fills their cap (`BOUND_UTILIZATION`: compute-bound, i.e.
prefilling) are raised at once, most bound first, into the room below the T2 release line
(T2 - hysteresis, the line the hold window releases at), each counted as drawing its whole new
cap. GPUs drawing well under their caps (decoding) keep them: under a clock lock that is the
watts they give for free. Low-priority tiers keep the hold window only: training is always
compute-bound, and lifting it would undo the anti-flapping rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from ampacity.power.budget import Actuator, BudgetSpec
from ampacity.power.telemetry import GpuId, GpuTelemetry

#: Share of its cap a capped GPU's draw must fill to count as slowed by it (compute-bound).
#: Compute-bound phases draw their whole cap and decoding draws about half of it (380 of
#: 700 W on H100, 250 of 400 W on A100), so 0.9 means "prompts most of the interval".
BOUND_UTILIZATION = 0.9


class Level(IntEnum):
    """Which POLCA threshold the budget's power is above (with hysteresis on the way down)."""

    NORMAL = 0
    T1 = 1
    T2 = 2


class EventKind(StrEnum):
    """Reasons for the Kubernetes Events the controller emits."""

    ENTERED_T1 = "EnteredT1"
    ENTERED_T2 = "EnteredT2"
    EXITED_T2 = "ExitedT2"
    EXITED_T1 = "ExitedT1"
    LIMIT_EXCEEDED = "LimitExceeded"
    LIMIT_RECOVERED = "LimitRecovered"
    TELEMETRY_STALE = "TelemetryStale"
    TELEMETRY_RECOVERED = "TelemetryRecovered"
    LIMIT_BELOW_FLOORS = "LimitBelowFloors"


@dataclass(frozen=True)
class PowerEvent:
    """A threshold crossing or telemetry change to report (`gpu` set for per-GPU events)."""

    kind: EventKind
    time: float
    total_watts: float
    message: str
    gpu: GpuId | None = None


@dataclass(frozen=True)
class GpuCap:
    """A cap the policy holds on one GPU, and since when the GPU has been capped."""

    cap_watts: float
    since: float


@dataclass(frozen=True)
class ReleaseWindow:
    """A hold window in progress for one tier: since when, the projected energy drawn and
    the highest projected power seen."""

    since: float
    watt_seconds: float = 0.0
    peak_watts: float = 0.0


@dataclass(frozen=True)
class PolicyState:
    """Everything `evaluate` remembers between rounds; the controller persists it in status.

    `caps` holds only capped GPUs; treat it as read-only (each round builds a new one).
    """

    level: Level = Level.NORMAL
    level_since: float | None = None
    caps: Mapping[GpuId, GpuCap] = field(default_factory=dict)
    low_release: ReleaseWindow | None = None
    high_release: ReleaseWindow | None = None
    stale: frozenset[GpuId] = frozenset()
    peak_watts: float = 0.0
    over_limit_since: float | None = None
    overrun_count: int = 0
    overrun_seconds: float = 0.0  # summed between consecutive over-limit rounds
    last_time: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, for the controller to keep in PowerBudget status."""
        return {
            "level": int(self.level),
            "levelSince": self.level_since,
            "caps": [
                {"node": g.node, "index": g.index, "capWatts": c.cap_watts, "since": c.since}
                for g, c in sorted(self.caps.items())
            ],
            "lowRelease": _window_to_dict(self.low_release),
            "highRelease": _window_to_dict(self.high_release),
            "stale": [{"node": g.node, "index": g.index} for g in sorted(self.stale)],
            "peakWatts": self.peak_watts,
            "overLimitSince": self.over_limit_since,
            "overrunCount": self.overrun_count,
            "overrunSeconds": self.overrun_seconds,
            "lastTime": self.last_time,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyState:
        """Inverse of `to_dict`."""
        return cls(
            level=Level(data["level"]),
            level_since=data["levelSince"],
            caps={GpuId(c["node"], c["index"]): GpuCap(c["capWatts"], c["since"]) for c in data["caps"]},
            low_release=_window_from_dict(data["lowRelease"]),
            high_release=_window_from_dict(data["highRelease"]),
            stale=frozenset(GpuId(g["node"], g["index"]) for g in data["stale"]),
            peak_watts=data["peakWatts"],
            over_limit_since=data["overLimitSince"],
            overrun_count=data["overrunCount"],
            overrun_seconds=data["overrunSeconds"],
            last_time=data["lastTime"],
        )


def _window_to_dict(window: ReleaseWindow | None) -> dict[str, float] | None:
    if window is None:
        return None
    return {"since": window.since, "wattSeconds": window.watt_seconds, "peakWatts": window.peak_watts}


def _window_from_dict(data: Mapping[str, float] | None) -> ReleaseWindow | None:
    if data is None:
        return None
    return ReleaseWindow(data["since"], data["wattSeconds"], data["peakWatts"])


@dataclass(frozen=True)
class CapAssignment:
    """The limit a GPU must enforce. Uncapped GPUs get their max (default) limit back."""

    gpu: GpuId
    cap_watts: float
    capped: bool
    since: float | None
    priority: str
    #: The GPU's highest settable limit (what "uncapped" is).
    max_watts: float = 0.0


@dataclass(frozen=True)
class BudgetSummary:
    """What PowerBudget status shows after a round."""

    total_watts: float
    peak_watts: float
    headroom_watts: float
    level: Level
    capped_gpus: int
    stale_gpus: int
    over_limit: bool
    overrun_count: int
    overrun_seconds: float
    #: The sum of every GPU's floor (its class's minimum cap within its settable range).
    floor_watts: float = 0.0

    @property
    def infeasible(self) -> bool:
        """The limit is below what the GPUs draw even at their floors."""
        return self.floor_watts > self.headroom_watts + self.total_watts


@dataclass(frozen=True)
class PolicyResult:
    """Output of one round: assignments (sorted by GPU), new state, events, summary."""

    assignments: tuple[CapAssignment, ...]
    state: PolicyState
    events: tuple[PowerEvent, ...]
    summary: BudgetSummary


def evaluate(
    budget: BudgetSpec, telemetry: Sequence[GpuTelemetry], state: PolicyState, now: float
) -> PolicyResult:
    """Run one policy round at time `now` (seconds, same clock as the telemetry timestamps)."""
    samples = sorted(telemetry, key=lambda t: t.gpu)
    if len({t.gpu for t in samples}) != len(samples):
        raise ValueError("duplicate GPU in telemetry")
    events: list[PowerEvent] = []

    stale = frozenset(t.gpu for t in samples if now - t.timestamp > budget.staleness_seconds)
    effective = {
        t.gpu: max(t.power_watts, t.limit_watts) if t.gpu in stale else t.power_watts for t in samples
    }
    total = sum(effective.values())
    present = set(effective)
    for gpu in sorted(stale - state.stale):
        events.append(
            PowerEvent(
                EventKind.TELEMETRY_STALE, now, total, f"{gpu} telemetry stale, counted at its limit", gpu
            )
        )
    for gpu in sorted((state.stale - stale) & present):
        events.append(
            PowerEvent(EventKind.TELEMETRY_RECOVERED, now, total, f"{gpu} telemetry fresh again", gpu)
        )

    level = _next_level(budget, state.level, total)
    events.extend(_level_events(state.level, level, now, total, budget))
    level_since = state.level_since if level == state.level else now

    over = total > budget.limit_watts
    was_over = state.over_limit_since is not None
    overrun_count = state.overrun_count + (1 if over and not was_over else 0)
    overrun_seconds = state.overrun_seconds
    if over and was_over and state.last_time is not None:
        overrun_seconds += now - state.last_time
    if over and not was_over:
        events.append(
            PowerEvent(
                EventKind.LIMIT_EXCEEDED,
                now,
                total,
                f"power {total:.0f} W above limit {budget.limit_watts:.0f} W",
            )
        )
    if was_over and not over:
        events.append(
            PowerEvent(EventKind.LIMIT_RECOVERED, now, total, f"power {total:.0f} W back under the limit")
        )
    over_limit_since = (state.over_limit_since if was_over else now) if over else None

    planner = _Planner(budget, samples, stale, effective, state.caps, now)
    low_tightened = high_tightened = False
    floors = sum(planner.floor(t) for t in samples)
    if floors > budget.limit_watts:
        # No assignment can keep this row under its limit: hold every GPU at its floor, the
        # least it can be given, and say so (the controller turns this into a condition).
        held = False
        for t in samples:
            held |= planner._set_cap(t, planner.floor(t))
        low_tightened |= held
        if held:
            events.append(
                PowerEvent(
                    EventKind.LIMIT_BELOW_FLOORS,
                    now,
                    total,
                    f"limit {budget.limit_watts:.0f} W is below the GPUs' minimum caps ({floors:.0f} W): "
                    "every GPU held at its minimum",
                )
            )
    if planner.projected_total() > budget.t2_watts:
        # Above T2 everything is capped: the lowest class goes straight to its floor (the
        # brake), every protected GPU is frozen at its current draw so none can grow.
        low_tightened |= planner.brake_lowest()
        high_tightened |= planner.freeze(planner.high)
    if planner.projected_total() > budget.t1_watts:
        target = (budget.t1_fraction - budget.margin_fraction) * budget.limit_watts
        for group in _by_rank(planner.low, planner, descending=False):
            low_tightened |= planner.shed(group, planner.projected_total() - target)
    if planner.projected_total() > budget.t2_watts:
        target = (budget.t2_fraction - budget.margin_fraction) * budget.limit_watts
        high_tightened |= planner.shed(planner.high, planner.projected_total() - target)

    if floors <= budget.limit_watts and not high_tightened:
        # Protected GPUs that a cap now slows get their watts back at once, not after a hold
        # window, wherever the row has room below the T2 release line (see the module notes).
        planner.lift_bound(
            planner.high, (budget.t2_fraction - budget.hysteresis_fraction) * budget.limit_watts
        )

    if floors > budget.limit_watts:
        high_release = low_release = None  # nothing may loosen while even the floors are too much
    else:
        high_release = _release(
            planner, planner.high, budget.t2_fraction, high_tightened, state.high_release, state.last_time
        )
        low_release = _release(
            planner, planner.low, budget.t1_fraction, low_tightened, state.low_release, state.last_time
        )

    assignments = tuple(planner.assignment(t) for t in samples)
    new_state = PolicyState(
        level=level,
        level_since=level_since,
        caps=dict(planner.caps),
        low_release=low_release,
        high_release=high_release,
        stale=stale,
        peak_watts=max(state.peak_watts, total),
        over_limit_since=over_limit_since,
        overrun_count=overrun_count,
        overrun_seconds=overrun_seconds,
        last_time=now,
    )
    summary = BudgetSummary(
        total_watts=total,
        peak_watts=new_state.peak_watts,
        headroom_watts=budget.limit_watts - total,
        level=level,
        capped_gpus=sum(1 for a in assignments if a.capped),
        stale_gpus=len(stale),
        over_limit=over,
        overrun_count=overrun_count,
        overrun_seconds=overrun_seconds,
        floor_watts=floors,
    )
    return PolicyResult(assignments, new_state, tuple(events), summary)


def _threshold_fraction(budget: BudgetSpec, level: Level) -> float:
    return budget.t2_fraction if level == Level.T2 else budget.t1_fraction


def _next_level(budget: BudgetSpec, previous: Level, total: float) -> Level:
    """Go up as soon as a threshold is crossed; come down one level at a time, and only
    once power is `hysteresis_fraction` below the threshold being left."""
    raw = Level.T2 if total > budget.t2_watts else Level.T1 if total > budget.t1_watts else Level.NORMAL
    if raw >= previous:
        return raw
    level = previous
    while level > raw:
        release_below = (_threshold_fraction(budget, level) - budget.hysteresis_fraction) * budget.limit_watts
        if total >= release_below:
            break
        level = Level(level - 1)
    return level


def _level_events(
    previous: Level, level: Level, now: float, total: float, budget: BudgetSpec
) -> list[PowerEvent]:
    events = []
    for crossed in range(previous + 1, level + 1):
        kind = EventKind.ENTERED_T1 if crossed == Level.T1 else EventKind.ENTERED_T2
        threshold = _threshold_fraction(budget, Level(crossed)) * budget.limit_watts
        events.append(
            PowerEvent(kind, now, total, f"power {total:.0f} W above {kind.value[-2:]} ({threshold:.0f} W)")
        )
    for crossed in range(previous, level, -1):
        kind = EventKind.EXITED_T2 if crossed == Level.T2 else EventKind.EXITED_T1
        events.append(PowerEvent(kind, now, total, f"power {total:.0f} W back below {kind.value[-2:]}"))
    return events


def _by_rank(
    samples: Iterable[GpuTelemetry], planner: _Planner, descending: bool
) -> list[list[GpuTelemetry]]:
    groups: dict[int, list[GpuTelemetry]] = {}
    for t in samples:
        groups.setdefault(planner.rank(t), []).append(t)
    return [groups[r] for r in sorted(groups, reverse=descending)]


def _release(
    planner: _Planner,
    tier: list[GpuTelemetry],
    threshold_fraction: float,
    tightened: bool,
    window: ReleaseWindow | None,
    last_time: float | None,
) -> ReleaseWindow | None:
    """Loosen a tier's caps when projected power averaged over a full hold window was below
    (threshold - hysteresis); return the tier's window for the next round."""
    budget, now = planner.budget, planner.now
    capped = [t for t in tier if t.gpu in planner.caps]
    if tightened or not capped:
        return None
    total = planner.projected_total()
    if window is None or last_time is None:
        return ReleaseWindow(now, 0.0, total)
    window = ReleaseWindow(
        window.since, window.watt_seconds + total * (now - last_time), max(window.peak_watts, total)
    )
    elapsed = now - window.since
    if elapsed < budget.hold_seconds:
        return window
    average = window.watt_seconds / elapsed if elapsed > 0 else total
    if average < (threshold_fraction - budget.hysteresis_fraction) * budget.limit_watts:
        headroom = (threshold_fraction - budget.margin_fraction) * budget.limit_watts - window.peak_watts
        for group in _by_rank(capped, planner, descending=True):
            headroom -= planner.raise_caps(group, headroom)
            if headroom <= 0:
                break
    # Each window is judged on its own; after a release the next one sees the new caps.
    return ReleaseWindow(now, 0.0, total)


class _Planner:
    """Mutable scratch space for one `evaluate` round (never escapes it)."""

    def __init__(
        self,
        budget: BudgetSpec,
        samples: list[GpuTelemetry],
        stale: frozenset[GpuId],
        effective: dict[GpuId, float],
        previous_caps: Mapping[GpuId, GpuCap],
        now: float,
    ) -> None:
        self.budget = budget
        self.now = now
        self.stale = stale
        self.caps = {t.gpu: previous_caps[t.gpu] for t in samples if t.gpu in previous_caps}
        self.projected = {
            t.gpu: effective[t.gpu] if t.gpu in stale else min(effective[t.gpu], self.cap_of(t))
            for t in samples
        }
        self.clocked = budget.actuator == Actuator.CLOCK_LOCK
        top = budget.top_rank
        self.low = [t for t in samples if self.rank(t) < top]
        self.high = [t for t in samples if self.rank(t) == top]
        self._total = sum(self.projected.values())

    def rank(self, t: GpuTelemetry) -> int:
        return self.budget.priority_class(t.priority).rank

    def floor(self, t: GpuTelemetry) -> float:
        minimum = self.budget.priority_class(t.priority).min_cap_watts
        return min(max(minimum, t.min_limit_watts), t.max_limit_watts)

    def cap_of(self, t: GpuTelemetry) -> float:
        held = self.caps.get(t.gpu)
        return held.cap_watts if held is not None else t.max_limit_watts

    def projected_total(self) -> float:
        return self._total

    def _set_cap(self, t: GpuTelemetry, cap: float) -> bool:
        """Tighten `t` to `cap` (never loosens); return whether anything changed."""
        cap = max(float(math.floor(cap)), self.floor(t))
        before = self.cap_of(t)
        if cap >= before:
            return False
        held = self.caps.get(t.gpu)
        self.caps[t.gpu] = GpuCap(cap, held.since if held is not None else self.now)
        if t.gpu in self.stale:
            return True  # an unseen GPU keeps counting at its limit until it reports again
        if self.clocked:
            # A clock lock scales every phase's draw (down to the watt backstop).
            new_projected = min(self.projected[t.gpu] * cap / before, cap)
        else:
            new_projected = min(self.projected[t.gpu], cap)
        self._total += new_projected - self.projected[t.gpu]
        self.projected[t.gpu] = new_projected
        return True

    def brake_lowest(self) -> bool:
        if not self.low:
            return False
        lowest = min(self.rank(t) for t in self.low)
        changed = False
        for t in self.low:
            if self.rank(t) == lowest:
                changed |= self._set_cap(t, self.floor(t))
        return changed

    def freeze(self, tier: list[GpuTelemetry]) -> bool:
        changed = False
        for t in tier:
            changed |= self._set_cap(t, max(self.projected[t.gpu], self.floor(t)))
        return changed

    def shed(self, tier: list[GpuTelemetry], need: float) -> bool:
        """Take up to `need` watts from `tier`, in proportion to what each GPU can give."""
        if need <= 0:
            return False
        # Stale GPUs give nothing: a cap they may never receive cannot be counted on.
        room = {t.gpu: 0.0 if t.gpu in self.stale else self._room(t) for t in tier}
        available = sum(room.values())
        if available <= 0:
            return False
        share = min(1.0, need / available)
        changed = False
        for t in tier:
            if room[t.gpu] > 0:
                target = self.projected[t.gpu] - room[t.gpu] * share
                # Under clock locks, the cap whose lock scales the draw down to the target.
                cap = self.cap_of(t) * target / self.projected[t.gpu] if self.clocked else target
                changed |= self._set_cap(t, cap)
        return changed

    def _room(self, t: GpuTelemetry) -> float:
        """Watts a GPU can give before its cap reaches the floor."""
        projected = self.projected[t.gpu]
        if self.clocked:
            return max(0.0, projected * (1.0 - self.floor(t) / self.cap_of(t)))
        return max(0.0, projected - self.floor(t))

    def raise_caps(self, group: list[GpuTelemetry], headroom: float) -> float:
        """Raise each capped GPU in `group` by an equal share of `headroom` (at most one
        release step); return the watts the raises could add if every GPU used them."""
        if headroom <= 0 or not group:
            return 0.0
        step = min(self.budget.release_step_watts, headroom / len(group))
        used = 0.0
        for t in group:
            held = self.caps[t.gpu]
            new_cap = float(math.floor(min(held.cap_watts + step, t.max_limit_watts)))
            if new_cap <= held.cap_watts:
                continue
            # Count the whole raise (not the GPU's current draw) so that if every raised GPU
            # jumps to its new cap the tier still lands under its threshold.
            used += new_cap - held.cap_watts
            if new_cap >= t.max_limit_watts:
                del self.caps[t.gpu]
            else:
                self.caps[t.gpu] = GpuCap(new_cap, held.since)
        self._total += used
        return used

    def lift_bound(self, tier: list[GpuTelemetry], ceiling: float) -> bool:
        """Raise the caps of the GPUs in `tier` that their cap is slowing, most bound first,
        into the room below `ceiling`; return whether any cap rose.

        A GPU is bound when its projected draw fills `BOUND_UTILIZATION` of its cap: it runs
        compute-bound work (prompts) that the cap slows. A capped GPU drawing well under its
        cap is decoding (memory-bound; under a clock lock at no cost down to the knee) and keeps
        its cap. Each raise is counted as if the GPU drew its whole new cap at once.
        """
        bound = [
            t
            for t in tier
            if t.gpu in self.caps
            and t.gpu not in self.stale
            and self.projected[t.gpu] >= BOUND_UTILIZATION * self.cap_of(t)
        ]
        bound.sort(key=lambda t: (-self.projected[t.gpu] / self.cap_of(t), t.gpu))
        changed = False
        for t in bound:
            headroom = ceiling - self._total
            held = self.caps[t.gpu]
            new_cap = float(math.floor(min(t.max_limit_watts, self.projected[t.gpu] + headroom)))
            if new_cap <= held.cap_watts:
                continue
            self._total += new_cap - self.projected[t.gpu]
            self.projected[t.gpu] = new_cap
            if new_cap >= t.max_limit_watts:
                del self.caps[t.gpu]
            else:
                self.caps[t.gpu] = GpuCap(new_cap, held.since)
            changed = True
        return changed

    def assignment(self, t: GpuTelemetry) -> CapAssignment:
        held = self.caps.get(t.gpu)
        if held is None:
            return CapAssignment(t.gpu, t.max_limit_watts, False, None, t.priority, t.max_limit_watts)
        return CapAssignment(t.gpu, held.cap_watts, True, held.since, t.priority, t.max_limit_watts)
