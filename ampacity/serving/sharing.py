"""Models sharing GPUs: which engines sleep, which wake, and the fencing that keeps at most one
awake on a GPU.

A sleeping engine (vLLM sleep mode) frees GPU memory, but its pod keeps the GPU in Kubernetes'
accounting; several pools save GPU-time only by sharing GPUs, their engines co-resident and at
most one awake at a time (AIBrix's model claims and llm-d's fast model actuation do the same).
This module is the pure decision the reconciler takes for one group of such engines, on the
state it observed (gather -> decide -> act):

- an engine whose idle time has passed its `TierSchedule`'s sleep (or stop) point goes to sleep
  (or is stopped); an engine without sleep mode goes straight to stop;
- an engine with requests waiting (the activator holds them) is woken, but only when no other
  engine on its GPU is awake or waking *as observed*: otherwise idle co-residents are put to sleep
  first and the wake comes on a later pass, once they are seen asleep. A co-resident that is
  running requests is never interrupted; the waiting engine waits for it (`WAITING_FOR_GPU`).
  Because the wake is issued only on observed state, two engines are never awake together, even
  when a sleep request is slow or lost.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ampacity.serving import tiers

# What an engine is observed doing: the tiers plus the two transitions under way.
WAKING, SLEEPING = "waking", "going-to-sleep"

# Actions on an engine.
WAKE, SLEEP, DEEP_SLEEP, STOP, START = "wake", "sleep", "deep-sleep", "stop", "start"

# Why an engine that has requests waiting was not woken this pass.
WAITING_FOR_GPU = "WaitingForGPU"
COLOCATED_BUSY = "a co-resident engine is running requests"


@dataclass(frozen=True)
class Engine:
    """One pool's engine in the group, as observed."""

    pool: str
    gpu: str
    """The GPU (node/device) it is resident on; a stopped engine holds none and starts anywhere."""
    state: str
    """`tiers.AWAKE`, `tiers.ASLEEP`, `tiers.DEEP_ASLEEP`, `tiers.STOPPED`, `WAKING`, `SLEEPING`."""
    busy: bool
    """Requests running on it."""
    waiting: int
    """Requests held for it (by the activator) or queued on it."""
    idle_seconds: float
    """Since its last request ended (0 while busy)."""
    schedule: tiers.TierSchedule
    sleep_levels: tuple[int, ...] = (1, 2)
    """What its engine supports; () for one without sleep mode (then stop/start only)."""


@dataclass(frozen=True)
class Action:
    pool: str
    action: str
    reason: str


@dataclass(frozen=True)
class GroupPlan:
    actions: tuple[Action, ...]
    blocked: dict[str, str]
    """Pool -> why its waiting requests are not being served yet (a reason in words)."""


def _awake_like(state: str) -> bool:
    return state in (tiers.AWAKE, WAKING)


def _idle_target(engine: Engine) -> str | None:
    """The action the engine's schedule asks for at its idle time, if any."""
    wanted = tiers.tier_at(engine.schedule, engine.idle_seconds)
    if wanted == tiers.AWAKE or engine.state == tiers.STOPPED:
        return None
    if wanted == tiers.STOPPED or not engine.sleep_levels:
        return STOP
    if wanted == tiers.DEEP_ASLEEP and 2 in engine.sleep_levels and engine.state != tiers.DEEP_ASLEEP:
        return DEEP_SLEEP
    if engine.state == tiers.AWAKE and wanted in (tiers.ASLEEP, tiers.DEEP_ASLEEP):
        return SLEEP if 1 in engine.sleep_levels else DEEP_SLEEP
    return None


def plan_group(engines: list[Engine]) -> GroupPlan:
    """The actions for one pass over a group (see the module docstring)."""
    actions: list[Action] = []
    blocked: dict[str, str] = {}
    by_gpu: dict[str, list[Engine]] = defaultdict(list)
    for engine in engines:
        if engine.state != tiers.STOPPED:
            by_gpu[engine.gpu].append(engine)
    for engine in engines:
        if engine.waiting or engine.busy:
            if engine.state == tiers.STOPPED:
                actions.append(Action(engine.pool, START, f"{engine.waiting} requests waiting"))
            continue
        target = _idle_target(engine)
        if target is not None and engine.state not in (WAKING, SLEEPING):
            actions.append(Action(engine.pool, target, f"idle {engine.idle_seconds:.0f}s"))
    for gpu, residents in by_gpu.items():
        wanting = [e for e in residents if e.waiting and not _awake_like(e.state) and e.state != SLEEPING]
        if not wanting:
            continue
        # The one with the most waiting requests goes first; the rest wait their turn.
        first = max(wanting, key=lambda e: (e.waiting, e.pool))
        others = [e for e in residents if e.pool != first.pool]
        running = [e for e in others if _awake_like(e.state) and (e.busy or e.waiting)]
        if running:
            blocked[first.pool] = f"{COLOCATED_BUSY} on GPU {gpu}: {', '.join(e.pool for e in running)}"
        else:
            to_sleep = [e for e in others if _awake_like(e.state) or e.state == SLEEPING]
            for e in to_sleep:
                if e.state != SLEEPING and not any(a.pool == e.pool for a in actions):
                    level = SLEEP if 1 in e.sleep_levels else (DEEP_SLEEP if e.sleep_levels else STOP)
                    actions.append(Action(e.pool, level, f"makes room on GPU {gpu} for {first.pool}"))
            if to_sleep:
                blocked[first.pool] = (
                    f"waiting for {', '.join(e.pool for e in to_sleep)} to sleep on GPU {gpu}"
                )
            else:
                actions.append(Action(first.pool, WAKE, f"{first.waiting} requests waiting"))
        for e in wanting:
            if e.pool != first.pool:
                blocked[e.pool] = f"GPU {gpu} is taken by {first.pool}, which has more requests waiting"
    return GroupPlan(tuple(actions), blocked)
