"""The capping policy: thresholds, priorities, hysteresis, staleness, overruns."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest

from ampacity.power.budget import Actuator, BudgetSpec, PriorityClass
from ampacity.power.policy import EventKind, GpuCap, Level, PolicyResult, PolicyState, evaluate
from ampacity.power.telemetry import GpuId, GpuTelemetry

LOW = PriorityClass("training", rank=0, min_cap_watts=300.0)
MID = PriorityClass("batch", rank=1, min_cap_watts=400.0)
HIGH = PriorityClass("serving", rank=2, min_cap_watts=500.0)

# 10 kW breaker: T1 8.5 kW, T2 9.5 kW; releases below 8.0 kW (T1) / 9.0 kW (T2).
BUDGET = BudgetSpec(limit_watts=10_000.0, classes=(LOW, HIGH), hold_seconds=30.0)


def gpu(
    node: str, index: int, power: float, priority: str, *, limit: float = 700.0, t: float = 0.0
) -> GpuTelemetry:
    return GpuTelemetry(GpuId(node, index), power, limit, 200.0, 700.0, priority, t)


def row(powers: Mapping[str, Sequence[float]], t: float = 0.0) -> list[GpuTelemetry]:
    return [gpu(p, i, w, p, t=t) for p, ws in powers.items() for i, w in enumerate(ws)]


def caps(result: PolicyResult) -> dict[str, float]:
    return {f"{a.gpu.node}/{a.gpu.index}": a.cap_watts for a in result.assignments}


def kinds(result: PolicyResult) -> list[EventKind]:
    return [e.kind for e in result.events]


def test_below_t1_nothing_is_capped() -> None:
    result = evaluate(BUDGET, row({"training": [700] * 6, "serving": [500] * 6}), PolicyState(), 0.0)
    assert result.summary.total_watts == 7200
    assert result.summary.headroom_watts == 2800
    assert result.summary.level == Level.NORMAL
    assert not any(a.capped for a in result.assignments)
    assert all(a.cap_watts == 700 for a in result.assignments)
    assert result.events == ()


def test_above_t1_caps_only_low_priority_down_to_just_below_t1() -> None:
    # 9.0 kW: between T1 and T2.
    result = evaluate(BUDGET, row({"training": [700] * 6, "serving": [600] * 8}), PolicyState(), 5.0)
    capped = [a for a in result.assignments if a.capped]
    assert capped and all(a.priority == "training" for a in capped)
    assert all(a.since == 5.0 for a in capped)
    projected = sum(min(700.0, c) for c in caps(result).values() if c < 700) + 8 * 600
    target = (BUDGET.t1_fraction - BUDGET.margin_fraction) * BUDGET.limit_watts
    assert projected == pytest.approx(target, abs=6)  # caps are whole watts
    assert kinds(result) == [EventKind.ENTERED_T1]


def test_lowest_priority_class_is_capped_before_the_next() -> None:
    budget = BudgetSpec(limit_watts=10_000.0, classes=(LOW, MID, HIGH))
    # 8.75 kW: 450 W to shed to reach T1 - margin, and training alone can give 2 x 400 W.
    telemetry = row({"training": [700] * 2, "batch": [700] * 4, "serving": [650] * 7})
    result = evaluate(budget, telemetry, PolicyState(), 0)
    by_class = {a.priority: a.capped for a in result.assignments}
    assert by_class == {"training": True, "batch": False, "serving": False}
    # 9.45 kW: 1150 W to shed; training's 800 W is not enough, batch gives the rest.
    telemetry = row({"training": [700] * 2, "batch": [700] * 4, "serving": [700] * 7 + [350]})
    result = evaluate(budget, telemetry, PolicyState(), 0)
    training = [a.cap_watts for a in result.assignments if a.priority == "training"]
    batch = [a.cap_watts for a in result.assignments if a.priority == "batch"]
    assert training == [300, 300]
    assert all(400 <= c < 700 for c in batch)
    assert not any(a.capped for a in result.assignments if a.priority == "serving")


def test_above_t2_caps_everything_and_brakes_lowest_priority_to_its_floor() -> None:
    # 9.95 kW: above T2.
    telemetry = row({"training": [700] * 4, "serving": [650] * 11})
    result = evaluate(BUDGET, telemetry, PolicyState(), 0.0)
    assert kinds(result) == [EventKind.ENTERED_T1, EventKind.ENTERED_T2]
    assert result.summary.level == Level.T2
    for a in result.assignments:
        if a.priority == "training":
            assert a.cap_watts == LOW.min_cap_watts
        else:
            assert a.capped and a.cap_watts == 650  # frozen at its current draw: it may not grow


def test_above_t2_protected_work_sheds_only_to_t2_when_low_priority_is_exhausted() -> None:
    # Training is already at its floor; serving alone pushes the row over T2.
    telemetry = row({"training": [300] * 2, "serving": [700] * 14})
    previous = PolicyState(caps={})
    result = evaluate(BUDGET, telemetry, previous, 0.0)
    serving = [a.cap_watts for a in result.assignments if a.priority == "serving"]
    projected = 600 + sum(serving)
    assert projected <= BUDGET.t2_watts
    assert projected > BUDGET.t1_watts  # protected work is not pushed down to T1
    assert min(serving) >= HIGH.min_cap_watts


def test_caps_never_go_below_class_minimum_or_gpu_minimum() -> None:
    low_floor = PriorityClass("training", rank=0, min_cap_watts=100.0)  # below the GPU's 200 W
    budget = BudgetSpec(limit_watts=5_000.0, classes=(low_floor, HIGH))
    result = evaluate(budget, row({"training": [700] * 4, "serving": [700] * 6}), PolicyState(), 0.0)
    for a in result.assignments:
        floor = 200.0 if a.priority == "training" else HIGH.min_cap_watts
        assert a.cap_watts >= floor


def _run(
    budget: BudgetSpec, state: PolicyState, demand: Mapping[str, Sequence[float]], now: float
) -> PolicyResult:
    """One closed-loop round: each GPU draws min(demand, its current cap)."""
    held = {g: c.cap_watts for g, c in state.caps.items()}
    telemetry = [
        gpu(p, i, min(w, held.get(GpuId(p, i), 700.0)), p, limit=held.get(GpuId(p, i), 700.0), t=now)
        for p, ws in demand.items()
        for i, w in enumerate(ws)
    ]
    return evaluate(budget, telemetry, state, now)


def test_caps_hold_inside_the_hysteresis_band() -> None:
    state = _run(BUDGET, PolicyState(), {"training": [700] * 6, "serving": [600] * 8}, 0.0).state
    capped = dict(state.caps)
    assert capped
    # Serving demand drops so that the capped row draws ~8.1 kW: below T1 but not below
    # T1 - hysteresis (8.0 kW).
    band_demand = {"training": [700] * 6, "serving": [580] * 8}
    for t in range(2, 300, 2):
        result = _run(BUDGET, state, band_demand, float(t))
        state = result.state
        assert 0.80 * BUDGET.limit_watts <= result.summary.total_watts < BUDGET.t1_watts
    assert dict(state.caps) == capped  # nothing released, nothing tightened: no flapping


def test_caps_release_after_a_hold_window_and_stay_under_t1() -> None:
    state = _run(BUDGET, PolicyState(), {"training": [700] * 6, "serving": [600] * 8}, 0.0).state
    low_demand = {"training": [700] * 6, "serving": [400] * 8}  # 7.4 kW uncapped
    released_at = None
    for t in range(2, 600, 2):
        result = _run(BUDGET, state, low_demand, float(t))
        if released_at is None and dict(result.state.caps) != dict(state.caps):
            released_at = t
            raised = [c.cap_watts - state.caps[g].cap_watts for g, c in result.state.caps.items()]
            assert all(0 < r <= BUDGET.release_step_watts for r in raised)  # one step at a time
        state = result.state
        assert (
            result.summary.total_watts <= (BUDGET.t1_fraction - BUDGET.margin_fraction) * BUDGET.limit_watts
        )
    assert released_at is not None and released_at >= BUDGET.hold_seconds
    assert not state.caps  # everything uncapped in the end


def test_short_dips_do_not_release_but_a_low_average_does() -> None:
    """Release looks at the window's average: one dip in a busy window releases nothing,
    while a mostly-low window with one spike (still under T1) does."""
    start = _run(BUDGET, PolicyState(), {"training": [700] * 6, "serving": [600] * 8}, 0.0).state
    band = {"training": [700] * 6, "serving": [580] * 8}  # ~8.1 kW capped
    dip = {"training": [700] * 6, "serving": [500] * 8}  # ~7.5 kW capped

    state = start
    for t in range(2, 64, 2):
        state = _run(BUDGET, state, dip if t == 20 else band, float(t)).state
    assert dict(state.caps) == dict(start.caps)

    state = start
    for t in range(2, 64, 2):
        state = _run(BUDGET, state, band if t == 20 else dip, float(t)).state
    assert dict(state.caps) != dict(start.caps)


def test_constant_overload_converges_without_flapping() -> None:
    demand = {"training": [700] * 6, "serving": [650] * 8}  # 9.4 kW uncapped
    state = PolicyState()
    changes = []
    for t in range(0, 400, 2):
        result = _run(BUDGET, state, demand, float(t))
        changes.append(dict(result.state.caps) != dict(state.caps))
        state = result.state
    assert any(changes[:5])
    assert not any(changes[10:])
    assert result.summary.total_watts < BUDGET.t1_watts


def test_level_events_have_hysteresis() -> None:
    state = evaluate(BUDGET, row({"training": [700] * 8, "serving": [600] * 5}), PolicyState(), 0).state
    assert state.level == Level.T1  # 8.6 kW
    # 8.2 kW: below T1 but inside the band; no ExitedT1.
    result = evaluate(BUDGET, row({"training": [700] * 8, "serving": [520] * 5}), state, 2)
    assert result.summary.level == Level.T1 and result.events == ()
    result = evaluate(BUDGET, row({"training": [700] * 8, "serving": [400] * 5}), result.state, 4)
    assert kinds(result) == [EventKind.EXITED_T1] and result.summary.level == Level.NORMAL


def test_stale_gpu_counts_at_its_limit_and_gives_nothing() -> None:
    fresh = [gpu("training", i, 700, "training", t=100.0) for i in range(4)]
    fresh += [gpu("serving", i, 600, "serving", t=100.0) for i in range(8)]
    # A serving GPU last heard from 60 s ago, at 100 W; its limit is 700 W.
    silent = gpu("silent", 0, 100.0, "training", t=40.0)
    result = evaluate(BUDGET, [*fresh, silent], PolicyState(), 100.0)
    assert result.summary.total_watts == 4 * 700 + 8 * 600 + 700  # 8.3 kW counted, not 7.7 kW
    assert result.summary.stale_gpus == 1
    assert kinds(result) == [EventKind.TELEMETRY_STALE]
    assert result.events[0].gpu == GpuId("silent", 0)
    # The same samples with fresh telemetry would leave everything uncapped (7.7 kW < T1);
    # here the pessimistic count still stays under T1, so check with more load:
    busier = [*fresh, gpu("training", 4, 700, "training", t=100.0), silent]
    result = evaluate(BUDGET, busier, PolicyState(), 100.0)
    assert result.summary.total_watts == 9_000
    silent_cap = next(a for a in result.assignments if a.gpu.node == "silent")
    assert not silent_cap.capped  # its share cannot be counted on, others pay for it
    assert any(a.capped for a in result.assignments if a.gpu.node == "training")
    # It reports again: recovered.
    back = evaluate(BUDGET, [*fresh, gpu("silent", 0, 100.0, "training", t=102.0)], result.state, 102.0)
    assert EventKind.TELEMETRY_RECOVERED in kinds(back)


def test_overruns_are_counted_and_timed() -> None:
    over = row({"training": [700] * 8, "serving": [700] * 8})  # 11.2 kW
    under = row({"training": [300] * 8, "serving": [600] * 8})
    s0 = evaluate(BUDGET, over, PolicyState(), 0.0)
    s1 = evaluate(BUDGET, over, s0.state, 2.0)
    s2 = evaluate(BUDGET, under, s1.state, 4.0)
    s3 = evaluate(BUDGET, over, s2.state, 6.0)
    assert EventKind.LIMIT_EXCEEDED in kinds(s0)
    assert EventKind.LIMIT_RECOVERED in kinds(s2)
    assert (s1.summary.overrun_count, s1.summary.overrun_seconds) == (1, 2.0)
    assert (s3.summary.overrun_count, s3.summary.overrun_seconds) == (2, 2.0)
    assert s3.summary.peak_watts == 11_200


def test_state_survives_a_json_round_trip() -> None:
    """The controller keeps the state in status between rounds; nothing may be lost."""
    state = PolicyState()
    for t, powers in enumerate(
        [{"training": [700] * 6, "serving": [650] * 8}, {"training": [700] * 6, "serving": [400] * 8}]
    ):
        state = evaluate(BUDGET, row(powers, t=2.0 * t), state, 2.0 * t).state
    stale = evaluate(BUDGET, [*row({"serving": [600]}, t=100.0), gpu("gone", 0, 50, "serving")], state, 100.0)
    for s in (state, stale.state):
        assert s.caps or s.stale
        assert PolicyState.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_unknown_priority_is_treated_as_lowest() -> None:
    result = evaluate(BUDGET, row({"mystery": [700] * 6, "serving": [600] * 8}), PolicyState(), 0.0)
    assert all(a.capped for a in result.assignments if a.priority == "mystery")
    assert not any(a.capped for a in result.assignments if a.priority == "serving")


def test_duplicate_gpus_are_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        evaluate(BUDGET, [gpu("n", 0, 100, "serving"), gpu("n", 0, 100, "serving")], PolicyState(), 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"t1_fraction": 0.96},  # T1 above T2
        {"margin_fraction": 0.06},  # margin wider than the hysteresis: would flap
        {"classes": ()},
        {"classes": (LOW, LOW)},
        {"limit_watts": 0.0},
    ],
)
def test_budget_validation(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"limit_watts": 10_000.0, "classes": (LOW, HIGH)} | kwargs
    with pytest.raises(ValueError):
        BudgetSpec(**args)  # type: ignore[arg-type]


def test_a_limit_below_the_floors_holds_every_gpu_at_its_floor_and_says_so() -> None:
    # 4 GPUs whose floors add up to 200 + 200 + 400 + 400 = 1200 W, on a 1000 W breaker.
    budget = BudgetSpec(
        limit_watts=1000, classes=(PriorityClass("batch", 0, 200), PriorityClass("interactive", 100, 400))
    )
    samples = [
        GpuTelemetry(GpuId("n0", i), 150.0, 700.0, 200.0, 700.0, "interactive" if i >= 2 else "batch", 0.0)
        for i in range(4)
    ]
    result = evaluate(budget, samples, PolicyState(), 0.0)
    assert result.summary.floor_watts == 1200 and result.summary.infeasible
    assert [a.cap_watts for a in result.assignments] == [200, 200, 400, 400]
    assert all(a.capped for a in result.assignments)
    assert [e.kind for e in result.events].count(EventKind.LIMIT_BELOW_FLOORS) == 1
    # The next round holds the floors without a second event and without releasing.
    again = evaluate(budget, samples, result.state, 100.0)
    assert [a.cap_watts for a in again.assignments] == [200, 200, 400, 400]
    assert EventKind.LIMIT_BELOW_FLOORS not in [e.kind for e in again.events]
    feasible = evaluate(BudgetSpec(limit_watts=5000, classes=budget.classes), samples, PolicyState(), 0.0)
    assert not feasible.summary.infeasible and not any(a.capped for a in feasible.assignments)


def test_clock_locks_take_the_same_watts_with_far_milder_caps_on_decoding_gpus() -> None:
    # 8 decoding GPUs at 340 W on a 3,000 W breaker: 2,720 W is above T1 (2,550 W), below T2.
    # The policy sheds down to T1 - margin (2,490 W), 230 W in all.
    watts = BudgetSpec(
        limit_watts=3000, classes=(PriorityClass("batch", 0, 300), PriorityClass("chat", 1, 500))
    )
    samples = [GpuTelemetry(GpuId("n0", i), 340.0, 700.0, 200.0, 700.0, "batch", 0.0) for i in range(8)]
    by_watts = evaluate(watts, samples, PolicyState(), 0.0)
    by_clocks = evaluate(replace(watts, actuator=Actuator.CLOCK_LOCK), samples, PolicyState(), 0.0)
    # A power limit must sit at the draw it allows: caps near 311 W, so a prompt burst on
    # these GPUs would run at less than half speed.
    watt_caps = [a.cap_watts for a in by_watts.assignments]
    assert all(305 <= c <= 315 for c in watt_caps)
    # A clock lock scales the draw: the same 230 W come from locks at the clock of a ~640 W cap.
    clock_caps = [a.cap_watts for a in by_clocks.assignments]
    assert all(630 <= c <= 650 for c in clock_caps)
    assert sum(340.0 * c / 700.0 for c in clock_caps) == pytest.approx(2490, abs=8)
    assert all(a.capped and a.max_watts == 700.0 for a in by_clocks.assignments)


# An inference-only row: the protected class alone, capped only above T2 (9.5 kW); its caps
# are lifted into the room below the T2 release line (9.0 kW).
SERVING_ROW = BudgetSpec(limit_watts=10_000.0, classes=(HIGH,), actuator=Actuator.CLOCK_LOCK)


def _capped_serving(draws: Sequence[float], cap: float, t: float) -> tuple[list[GpuTelemetry], PolicyState]:
    samples = [gpu("serving", i, w, "serving", limit=cap, t=t) for i, w in enumerate(draws)]
    held = {s.gpu: GpuCap(cap, 0.0) for s in samples}
    return samples, PolicyState(level=Level.T2, level_since=0.0, caps=held, last_time=t - 2.0)


def test_protected_gpus_a_cap_slows_are_lifted_into_the_room_below_the_t2_release_line() -> None:
    # GPUs 0-7 prefill at their 600 W caps (bound); 8-17 decode at 390 W under the same caps.
    # 8.7 kW leaves 300 W below the 9.0 kW release line, well inside the 30 s hold window.
    samples, state = _capped_serving([600.0] * 8 + [390.0] * 10, 600.0, t=4.0)
    result = evaluate(SERVING_ROW, samples, state, 4.0)
    after = caps(result)
    raised = {g: c for g, c in after.items() if c > 600}
    # The 300 W go to bound GPUs only, each counted as drawing its whole new cap.
    assert sum(c - 600 for c in raised.values()) == pytest.approx(300, abs=1)
    assert raised and all(int(g.split("/")[1]) < 8 for g in raised)
    assert all(after[f"serving/{i}"] == 600 for i in range(8, 18))  # decoding GPUs keep theirs
    assert 8700 + sum(c - 600 for c in raised.values()) <= 9000
    assert result.state.high_release is not None  # the hold window still runs for the rest


def test_protected_gpus_are_not_lifted_above_the_release_line_or_when_decoding() -> None:
    # 9.1 kW: below T2, above the release line: no room, nothing moves.
    samples, state = _capped_serving([600.0] * 8 + [430.0] * 10, 600.0, t=4.0)
    assert caps(evaluate(SERVING_ROW, samples, state, 4.0)) == {
        s.gpu.node + f"/{s.gpu.index}": 600 for s in samples
    }
    # Plenty of room, but every GPU decodes under its cap: none is slowed, none is lifted.
    samples, state = _capped_serving([390.0] * 18, 600.0, t=4.0)
    assert set(caps(evaluate(SERVING_ROW, samples, state, 4.0)).values()) == {600}
