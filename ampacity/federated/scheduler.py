"""Cohort selection and local-step assignment for federated rounds (pure: values in, decisions out).

FedCompass (Li et al., ICLR 2024) puts clients into *arrival groups*: every member of a group gets a
number of local steps Q in [Q_min, Q_max] chosen from its estimated seconds per step so that all
members finish at about the same time, and the server aggregates a group when it arrives instead of
waiting for the slowest client in the federation (synchronous FedAvg) or applying every update alone
(FedAsync, Xie et al. 2019). A fast client therefore does a short trip to join a group that is about
to land, a slow one starts or joins a group that lands later, and no one sits idle waiting for the
slowest device.

An update that misses its group's latest arrival time is not dropped: it is buffered into the next
aggregation with a staleness weight that decreases with how many global versions it missed, the
polynomial weight of FedAsync and FedBuff (Nguyen et al., AISTATS 2022).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

DEFAULT_LATENESS = 1.2
DEFAULT_STALENESS_EXPONENT = 0.5


@dataclass(frozen=True)
class StepBounds:
    """The local-step range [Q_min, Q_max] a round allows."""

    q_min: int
    q_max: int

    def __post_init__(self) -> None:
        if not 1 <= self.q_min <= self.q_max:
            raise ValueError(f"need 1 <= Q_min <= Q_max, got [{self.q_min}, {self.q_max}]")


@dataclass(frozen=True)
class Group:
    """An arrival group: members expected at `expected_arrival_s`, aggregated by `latest_arrival_s`."""

    group_id: int
    created_s: float
    expected_arrival_s: float
    latest_arrival_s: float
    members: tuple[str, ...]


@dataclass(frozen=True)
class Assignment:
    """What one client is told to do: `local_steps` from `start_s`, due by `deadline_s`."""

    client_id: str
    group_id: int
    local_steps: int
    start_s: float
    expected_arrival_s: float
    deadline_s: float


@dataclass(frozen=True)
class CompassPlan:
    """The open arrival groups; `next_group_id` keeps ids unique across the plan's life."""

    groups: tuple[Group, ...] = ()
    next_group_id: int = 0

    def group(self, group_id: int) -> Group:
        for g in self.groups:
            if g.group_id == group_id:
                return g
        raise KeyError(f"no open group {group_id}")


@dataclass(frozen=True)
class ClientInfo:
    """A registered client as the selector sees it."""

    client_id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    available: bool = True


def staleness_weight(staleness: int, exponent: float = DEFAULT_STALENESS_EXPONENT) -> float:
    """(1 + staleness)^-exponent: 1 for a fresh update, strictly decreasing as it grows staler."""
    if staleness < 0:
        raise ValueError(f"staleness cannot be negative, got {staleness}")
    if exponent <= 0:
        raise ValueError(f"the exponent must be positive so that the weight decreases, got {exponent}")
    return float((1.0 + staleness) ** -exponent)


def _latest(now_s: float, expected_s: float, lateness: float) -> float:
    # The grace period scales with the trip length: a 10-minute group tolerates more jitter than a
    # 10-second one (FedCompass's lambda).
    return now_s + lateness * (expected_s - now_s)


def assign_client(
    plan: CompassPlan,
    client_id: str,
    seconds_per_step: float,
    now_s: float,
    bounds: StepBounds,
    lateness: float = DEFAULT_LATENESS,
) -> tuple[Assignment, CompassPlan]:
    """Place one (idle) client into an arrival group and choose its local steps.

    Among open groups that land in the future, the client joins the one where it can do the most
    steps without leaving [Q_min, Q_max]: more steps per trip means less communication per unit of
    progress. If no group fits (the client is too slow to do Q_min before any of them lands, or so
    fast it would exceed Q_max and then idle) it opens a new group with Q_max steps.
    """
    if seconds_per_step <= 0:
        raise ValueError(f"seconds_per_step must be positive, got {seconds_per_step}")
    if lateness < 1:
        raise ValueError(f"lateness must be at least 1, got {lateness}")
    best: tuple[int, float, Group] | None = None
    for g in plan.groups:
        if g.expected_arrival_s <= now_s:
            continue
        steps = math.floor((g.expected_arrival_s - now_s) / seconds_per_step)
        if bounds.q_min <= steps <= bounds.q_max:
            # Prefer more steps, then the earlier group (deterministic tie-break).
            key = (steps, -g.expected_arrival_s)
            if best is None or key > (best[0], -best[1]):
                best = (steps, g.expected_arrival_s, g)
    if best is not None:
        steps, _, chosen = best
        updated = replace(chosen, members=(*chosen.members, client_id))
        groups = tuple(updated if g.group_id == chosen.group_id else g for g in plan.groups)
        assignment = Assignment(
            client_id,
            chosen.group_id,
            steps,
            now_s,
            chosen.expected_arrival_s,
            chosen.latest_arrival_s,
        )
        return assignment, replace(plan, groups=groups)
    expected = now_s + bounds.q_max * seconds_per_step
    group = Group(plan.next_group_id, now_s, expected, _latest(now_s, expected, lateness), (client_id,))
    assignment = Assignment(client_id, group.group_id, bounds.q_max, now_s, expected, group.latest_arrival_s)
    return assignment, CompassPlan((*plan.groups, group), plan.next_group_id + 1)


def initial_assignments(
    speeds: Mapping[str, float],
    now_s: float,
    bounds: StepBounds,
    lateness: float = DEFAULT_LATENESS,
    plan: CompassPlan | None = None,
) -> tuple[list[Assignment], CompassPlan]:
    """Assign a whole cohort at once, fastest client first.

    Fastest first means the first group lands soonest (Q_max fast steps) and slower clients fill it
    with fewer steps until they would drop below Q_min, at which point the next slowest opens a
    later group, so the cohort splits into a few groups of similar-speed clients.
    """
    current = plan or CompassPlan()
    out: list[Assignment] = []
    for client_id in sorted(speeds, key=lambda c: (speeds[c], c)):
        assignment, current = assign_client(current, client_id, speeds[client_id], now_s, bounds, lateness)
        out.append(assignment)
    return out, current


def group_ready(group: Group, arrived: Sequence[str] | frozenset[str], now_s: float) -> bool:
    """A group is aggregated when every member has arrived or its latest arrival time has passed."""
    return now_s >= group.latest_arrival_s or set(group.members) <= set(arrived)


def close_group(plan: CompassPlan, group_id: int) -> CompassPlan:
    """Drop an aggregated group from the plan; its missing members are now late."""
    plan.group(group_id)
    return replace(plan, groups=tuple(g for g in plan.groups if g.group_id != group_id))


def synchronous_assignments(
    speeds: Mapping[str, float], now_s: float, bounds: StepBounds, deadline_s: float
) -> list[Assignment]:
    """FedAvg and FedBuff: every client does Q_max steps, all due at the round deadline."""
    return [
        Assignment(c, 0, bounds.q_max, now_s, now_s + bounds.q_max * speeds[c], deadline_s)
        for c in sorted(speeds)
    ]


def _rank(seed: int, round_index: int, client_id: str) -> bytes:
    # A keyed hash rather than random.sample: the controller may restart between selecting and
    # persisting, and the same (seed, round) must pick the same cohort in every process.
    return hashlib.sha256(f"{seed}:{round_index}:{client_id}".encode()).digest()


def select_cohort(
    clients: Sequence[ClientInfo],
    size: int,
    round_index: int,
    seed: int = 0,
    selector: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """Pick up to `size` available clients whose labels match `selector`, uniformly and reproducibly.

    Uniform sampling keeps the aggregate unbiased for FedAvg; selection does not favour fast
    clients because FedCompass absorbs speed differences through Q rather than by excluding slow
    (and possibly differently distributed) clients.
    """
    if size < 0:
        raise ValueError(f"cohort size cannot be negative, got {size}")
    wanted = dict(selector or {})
    eligible = [
        c for c in clients if c.available and all(c.labels.get(key) == value for key, value in wanted.items())
    ]
    eligible.sort(key=lambda c: _rank(seed, round_index, c.client_id))
    return tuple(c.client_id for c in eligible[:size])


def quorum_met(received: int, min_quorum: int) -> bool:
    """Whether a round may aggregate with `received` accepted updates."""
    return received >= max(1, min_quorum)
