"""Sleep/wake decisions for engines sharing GPUs, and the fencing that keeps one awake per GPU."""

from __future__ import annotations

import math
import random

from ampacity.serving import sharing, tiers
from ampacity.serving.sharing import Action, Engine

SLEEP_AT_ONCE = tiers.TierSchedule(0.0, math.inf, math.inf)


def _engine(pool: str, state: str, gpu: str = "node-a/0", **kwargs: object) -> Engine:
    fields: dict[str, object] = {"busy": False, "waiting": 0, "idle_seconds": 60.0, "schedule": SLEEP_AT_ONCE}
    fields.update(kwargs)
    return Engine(pool, gpu, state, **fields)  # type: ignore[arg-type]


def test_a_wake_waits_until_the_idle_co_resident_is_seen_asleep() -> None:
    awake = _engine("chat", tiers.AWAKE, schedule=tiers.keep_alive(3600.0))
    wanted = _engine("code", tiers.ASLEEP, waiting=3)
    first = sharing.plan_group([awake, wanted])
    assert first.actions == (Action("chat", sharing.SLEEP, "makes room on GPU node-a/0 for code"),)
    assert first.blocked == {"code": "waiting for chat to sleep on GPU node-a/0"}
    # Next pass: chat is observed asleep, so code is woken.
    second = sharing.plan_group([_engine("chat", tiers.ASLEEP, schedule=tiers.keep_alive(3600.0)), wanted])
    assert second.actions == (Action("code", sharing.WAKE, "3 requests waiting"),)
    assert second.blocked == {}


def test_a_co_resident_running_requests_is_never_interrupted() -> None:
    running = _engine("chat", tiers.AWAKE, busy=True, idle_seconds=0.0)
    wanted = _engine("code", tiers.ASLEEP, waiting=1)
    plan = sharing.plan_group([running, wanted])
    assert plan.actions == ()
    assert plan.blocked["code"].startswith(sharing.COLOCATED_BUSY)


def test_idle_engines_follow_their_schedule_and_an_engine_without_sleep_mode_stops() -> None:
    schedule = tiers.TierSchedule(60.0, 600.0, 3600.0)
    plan = sharing.plan_group(
        [
            _engine("a", tiers.AWAKE, idle_seconds=120.0, schedule=schedule),
            _engine("b", tiers.ASLEEP, gpu="node-a/1", idle_seconds=700.0, schedule=schedule),
            _engine("c", tiers.ASLEEP, gpu="node-a/2", idle_seconds=4000.0, schedule=schedule),
            _engine("d", tiers.AWAKE, gpu="node-a/3", idle_seconds=120.0, schedule=schedule, sleep_levels=()),
            _engine("e", tiers.AWAKE, gpu="node-a/4", idle_seconds=30.0, schedule=schedule),
        ]
    )
    assert {(a.pool, a.action) for a in plan.actions} == {
        ("a", sharing.SLEEP),
        ("b", sharing.DEEP_SLEEP),
        ("c", sharing.STOP),
        ("d", sharing.STOP),
    }


def test_a_stopped_engine_with_requests_waiting_is_started() -> None:
    plan = sharing.plan_group([_engine("chat", tiers.STOPPED, waiting=2)])
    assert plan.actions == (Action("chat", sharing.START, "2 requests waiting"),)


def test_fencing_never_wakes_an_engine_beside_one_that_is_awake_waking_or_going_to_sleep() -> None:
    rng = random.Random(7)
    states = [tiers.AWAKE, tiers.ASLEEP, tiers.DEEP_ASLEEP, tiers.STOPPED, sharing.WAKING, sharing.SLEEPING]
    for _ in range(2000):
        engines = [
            _engine(
                f"p{i}",
                rng.choice(states),
                gpu=f"gpu-{rng.randrange(3)}",
                busy=rng.random() < 0.3,
                waiting=rng.choice([0, 0, 1, 5]),
                idle_seconds=rng.choice([0.0, 30.0, 5000.0]),
            )
            for i in range(rng.randrange(1, 8))
        ]
        plan = sharing.plan_group(engines)
        woken = [a.pool for a in plan.actions if a.action == sharing.WAKE]
        by_pool = {e.pool: e for e in engines}
        for pool in woken:
            gpu = by_pool[pool].gpu
            neighbours = [e for e in engines if e.gpu == gpu and e.pool != pool and e.state != tiers.STOPPED]
            assert all(e.state in (tiers.ASLEEP, tiers.DEEP_ASLEEP) for e in neighbours), (engines, plan)
        assert len({by_pool[p].gpu for p in woken}) == len(woken)  # one wake per GPU per pass
