"""The three-tier idle policy (awake, asleep, stopped) and its replay on a trace."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ampacity.serving import tiers
from ampacity.serving.eval import coldstart
from ampacity.serving.keepalive import IdleTimeHistogram
from ampacity.serving.tiers import TierCosts, TierPolicy, TierSchedule

COSTS = TierCosts(cold_start_seconds=22.7, weight_bytes_per_gpu=24 * tiers.GB, sleepers_per_gpu=8)


def _histogram(
    idle_seconds: list[float], bin_seconds: float = 10.0, range_seconds: float = 4 * 3600.0
) -> IdleTimeHistogram:
    histogram = IdleTimeHistogram(bin_seconds=bin_seconds, range_seconds=range_seconds)
    for idle in idle_seconds:
        histogram = histogram.record(idle)
    return histogram


def test_wake_times_follow_vllms_published_measurements() -> None:
    # vLLM blog (A100, 0.11.0): Qwen3-0.6B (1.2 GB) and Phi-3-vision (8.3 GB).
    assert tiers.wake_seconds(1, 1.2 * tiers.GB) == pytest.approx(0.26, abs=0.02)
    assert tiers.wake_seconds(1, 8.3 * tiers.GB) == pytest.approx(0.82, abs=0.02)
    assert tiers.wake_seconds(2, 1.2 * tiers.GB) == pytest.approx(0.85, abs=0.02)
    assert tiers.wake_seconds(2, 8.3 * tiers.GB) == pytest.approx(2.58, abs=0.02)
    with pytest.raises(ValueError, match="sleep level must be 1 or 2"):
        tiers.wake_seconds(3, 1.0)


def test_tier_costs_per_second_and_per_resume() -> None:
    costs = TierCosts(
        cold_start_seconds=30.0, weight_bytes_per_gpu=10 * tiers.GB, sleepers_per_gpu=8, host_byte_price=1e-12
    )
    assert costs.rate(tiers.AWAKE) == 1.0
    assert costs.rate(tiers.ASLEEP) == pytest.approx(1 / 8 + 0.01)  # a share of the GPU plus pinned memory
    assert costs.rate(tiers.DEEP_ASLEEP) == pytest.approx(1 / 8)
    assert costs.rate(tiers.STOPPED) == 0.0
    assert costs.resume_seconds(tiers.STOPPED) == 30.0
    assert costs.resume_seconds(tiers.AWAKE) == 0.0
    with pytest.raises(ValueError, match="sleepers_per_gpu"):
        TierCosts(cold_start_seconds=1.0, sleepers_per_gpu=0)


def test_schedule_tiers_over_an_idle_period() -> None:
    schedule = TierSchedule(60.0, 600.0, 3600.0)
    assert [tiers.tier_at(schedule, t) for t in (0.0, 59.9, 60.0, 599.0, 600.0, 3600.0, 1e9)] == [
        tiers.AWAKE,
        tiers.AWAKE,
        tiers.ASLEEP,
        tiers.ASLEEP,
        tiers.DEEP_ASLEEP,
        tiers.STOPPED,
        tiers.STOPPED,
    ]
    assert tiers.next_change(schedule, 30.0) == 30.0
    assert tiers.next_change(schedule, 700.0) == 2900.0
    assert tiers.next_change(schedule, 4000.0) is None
    assert tiers.held_seconds(schedule, 1000.0) == {
        tiers.AWAKE: 60.0,
        tiers.ASLEEP: 540.0,
        tiers.DEEP_ASLEEP: 400.0,
        tiers.STOPPED: 0.0,
    }
    with pytest.raises(ValueError, match="sleep_after <= deep_sleep_after"):
        TierSchedule(600.0, 60.0, 3600.0)


def test_hourly_model_sleeps_at_once_and_wakes_instead_of_starting_cold() -> None:
    # An hour idle: awake costs 3600 GPU-s, asleep 450 + a 2 s wake, stopped a 22.7 s cold start.
    history = _histogram([3600.0] * 20)
    schedule = tiers.decide(history, COSTS, TierPolicy(waiting_cost=100.0))
    assert schedule.reason == tiers.LEARNED
    assert schedule.sleep_after == 0.0
    assert tiers.tier_at(schedule, 3600.0) == tiers.ASLEEP
    # When a second of waiting is worth little, stopping is cheaper than sleeping for an hour.
    cheap = tiers.decide(history, COSTS, TierPolicy(waiting_cost=1.0))
    assert tiers.tier_at(cheap, 1.0) == tiers.STOPPED


def test_bursty_model_stays_awake_through_its_short_gaps() -> None:
    schedule = tiers.decide(_histogram([5.0] * 30), COSTS, TierPolicy(waiting_cost=10.0))
    assert tiers.tier_at(schedule, 5.0) == tiers.AWAKE
    assert schedule.sleep_after == 10.0  # the end of the bin that holds every gap


def test_engine_without_sleep_mode_gets_a_two_tier_schedule() -> None:
    no_sleep = TierCosts(cold_start_seconds=22.7, sleep_levels=())
    schedule = tiers.decide(_histogram([3600.0] * 20), no_sleep, TierPolicy(waiting_cost=100.0))
    assert schedule.sleep_after == schedule.deep_sleep_after == schedule.stop_after
    assert no_sleep.available() == (tiers.AWAKE, tiers.STOPPED)


def test_priced_host_memory_sends_long_sleeps_to_level_2_unless_its_wake_is_too_slow() -> None:
    # Two hours idle. Level 1 pins 24 GB at 0.005 GPU-s per GB-s: 7200 s * 0.245 + a 2.07 s wake
    # (1971 at 100 GPU-s per waiting second); level 2: 7200 * 0.125 + a 6.42 s wake (1542);
    # stopped: a 22.7 s cold start (2270).
    priced = TierCosts(cold_start_seconds=22.7, sleepers_per_gpu=8, host_byte_price=0.005 / tiers.GB)
    history = _histogram([7200.0] * 20)
    schedule = tiers.decide(history, priced, TierPolicy(waiting_cost=100.0))
    assert tiers.tier_at(schedule, 7200.0) == tiers.DEEP_ASLEEP
    bounded = TierCosts(
        cold_start_seconds=22.7, sleepers_per_gpu=8, host_byte_price=0.005 / tiers.GB, max_wake_seconds=5.0
    )
    assert tiers.DEEP_ASLEEP not in bounded.available()  # level 2 wakes in 6.4 s at 24 GB
    assert (
        tiers.tier_at(tiers.decide(history, bounded, TierPolicy(waiting_cost=100.0)), 7200.0) == tiers.ASLEEP
    )


def test_a_new_model_starts_from_the_prior_and_without_one_from_a_ski_rental() -> None:
    prior = _histogram([3600.0] * 50)
    schedule = tiers.decide(_histogram([]), COSTS, TierPolicy(waiting_cost=100.0), prior)
    assert schedule.reason == tiers.PRIOR
    assert tiers.tier_at(schedule, 3600.0) == tiers.ASLEEP
    bare = tiers.decide(_histogram([]), COSTS, TierPolicy(waiting_cost=2.0))
    assert bare == TierSchedule(2.0 * 22.7, 2.0 * 22.7, 2.0 * 22.7, tiers.NO_HISTORY)
    with pytest.raises(ValueError, match="the model's bins"):
        tiers.decide(_histogram([1.0]), COSTS, TierPolicy(1.0), _histogram([1.0], bin_seconds=60.0))


def _expected_cost(
    idle: list[float], schedule: TierSchedule, costs: TierCosts, waiting_cost: float, width: float
) -> float:
    """The objective on the samples themselves, each idle time at its bin's middle (as `decide`)."""
    total = 0.0
    for raw in idle:
        x = (math.floor(raw / width) + 0.5) * width
        held = tiers.held_seconds(schedule, x)
        total += sum(costs.rate(t) * s for t, s in held.items())
        total += waiting_cost * costs.resume_seconds(tiers.tier_at(schedule, x))
    return total / len(idle)


def test_decide_finds_the_cheapest_ordered_thresholds() -> None:
    rng = np.random.default_rng(3)
    idle = rng.lognormal(4.0, 1.2, 200).clip(0, 199).tolist()
    costs = TierCosts(
        cold_start_seconds=40.0, weight_bytes_per_gpu=24 * tiers.GB, host_byte_price=0.005 / tiers.GB
    )
    policy = TierPolicy(waiting_cost=3.0)
    history = _histogram(idle, bin_seconds=10.0, range_seconds=200.0)
    chosen = tiers.decide(history, costs, policy)
    edges = [10.0 * i for i in range(21)]
    brute = min(
        (_expected_cost(idle, TierSchedule(a, b, c), costs, 3.0, 10.0), (a, b, c))
        for a, b, c in itertools.combinations_with_replacement(edges, 3)
    )
    assert _expected_cost(idle, chosen, costs, 3.0, 10.0) == pytest.approx(brute[0], rel=1e-9)


def _model(arrivals: list[float], execution: float = 10.0, load: float = 20.0) -> coldstart.ModelRequests:
    n = len(arrivals)
    return coldstart.ModelRequests("m", np.array(arrivals), np.full(n, execution), np.full(n, load))


def test_fixed_keepalive_replays_as_in_the_two_tier_study() -> None:
    trace = coldstart.ColdStartTrace((_model([0.0, 320.0, 2330.0, 2335.0]),), np.array([20.0]))
    colds, _, idle, _ = coldstart.replay_model(trace.models[0], 600.0, startup=20.0)
    result = coldstart.replay_tiers(trace, tiers.keep_alive(600.0), COSTS)
    assert result.cold_starts == colds
    assert result.idle_gpu_seconds == pytest.approx(idle)
    # The request 5 s into the 20 s load waits its last 15 s: a waiting request, not a cold start.
    assert sorted(result.cold_waits.tolist()) == [15.0, 20.0, 20.0]


def test_a_sleeping_model_is_woken_and_costs_its_gpu_share() -> None:
    # Gaps of 1990 s: fixed 10 min starts cold; sleeping at once wakes in 2 s for 1990/8 GPU-s.
    trace = coldstart.ColdStartTrace((_model([0.0, 2020.0]),), np.array([20.0]))
    result = coldstart.replay_tiers(trace, TierSchedule(0.0, math.inf, math.inf), COSTS)
    assert result.cold_starts == 1  # only the first request
    assert result.wakes == {1: 1}
    assert result.woken_waits.tolist() == [pytest.approx(tiers.wake_seconds(1, 24 * tiers.GB))]
    assert result.idle_gpu_seconds == pytest.approx(1990.0 / 8)
    assert result.tier_seconds[tiers.ASLEEP] == pytest.approx(1990.0)


def test_the_window_counts_only_the_reported_part_and_the_split_halves_requests() -> None:
    trace = coldstart.ColdStartTrace((_model([0.0, 2020.0, 4040.0, 6060.0]),), np.array([20.0]))
    assert coldstart.split_time(trace) == 4040.0
    assert coldstart.before(trace, 4040.0).requests == 2
    reported = coldstart.replay_tiers(trace, tiers.keep_alive(600.0), COSTS, (4040.0, math.inf))
    assert (reported.requests, reported.cold_starts) == (2, 2)
    assert reported.idle_gpu_seconds == pytest.approx(2 * 600.0)


def test_clairvoyant_bound_sleeps_through_the_gaps_it_can_afford_and_stops_the_rest() -> None:
    trace = coldstart.ColdStartTrace((_model([0.0, 130.0, 10_150.0]),), np.array([20.0]))
    window = (-math.inf, math.inf)
    # One cold start is worth 100 GPU-s: sleeping 100 s costs 12.5, sleeping 10,000 s costs 1,250.
    bound = coldstart.clairvoyant_tiers(trace, COSTS, 1 / 100.0, window)
    assert bound.cold_starts == 2
    assert bound.wakes == {1: 1}
    assert bound.idle_gpu_seconds == pytest.approx(100.0 / 8)


def test_tier_study_on_the_alibaba_trace_is_tuned_on_the_first_half(traces_present: None) -> None:
    trace = coldstart.load_alibaba_genai()
    split = coldstart.split_time(trace)
    train = coldstart.before(trace, split)
    assert 0.45 < train.requests / trace.requests <= 0.55
    prior = coldstart.prior_histogram(trace, split)
    assert prior.total == sum(
        len(coldstart.idle_times(m)[coldstart._gap_ends(m) < split]) for m in trace.models
    )


def test_locality_places_a_cold_start_where_the_weights_are_cached() -> None:
    # Two loads measured: a fast one (node-local) and a slow one (fetched).
    trace = coldstart.ColdStartTrace((), np.array([2.0, 30.0]))
    # The same model starts cold ten times: after the first, its weights sit on one node.
    events = tuple((float(i), "sd-xl", True) for i in range(10))
    result = coldstart.locality_study(trace, events, nodes=8, cached_models_per_node=4)
    assert result.local_with == 9  # every start after the first finds the node that cached it
    assert result.local_without < 9  # blind placement lands on other nodes too
    assert result.seconds_with == 30.0 + 9 * 2.0
    assert result.saved > 0


def test_a_cache_too_small_for_the_models_in_turn_gives_locality_nothing() -> None:
    trace = coldstart.ColdStartTrace((), np.array([2.0, 30.0]))
    events = tuple((float(i), f"model-{i % 3}", True) for i in range(12))
    result = coldstart.locality_study(trace, events, nodes=1, cached_models_per_node=1)
    assert result.local_with == result.local_without == 0
    assert result.saved == 0.0


def test_fencing_makes_a_wake_wait_for_a_co_resident_that_is_executing() -> None:
    # Model a runs 0-100 s and 1000-1100 s; b sleeps and is woken at 1050 s, mid-way through a's run.
    a = coldstart.ModelRequests("a", np.array([0.0, 1000.0]), np.array([100.0, 100.0]), np.array([0.0, 0.0]))
    b = coldstart.ModelRequests("b", np.array([0.0, 1050.0]), np.array([10.0, 10.0]), np.array([0.0, 0.0]))
    trace = coldstart.ColdStartTrace((a, b), np.array([20.0]))
    result = coldstart.replay_tiers(trace, TierSchedule(0.0, math.inf, math.inf), COSTS)
    wake = tiers.wake_seconds(1, 24 * tiers.GB)
    shared = coldstart.fencing_check(trace, result, sleepers_per_gpu=2)
    assert shared.wakes == 2 and shared.delayed == 1
    # a's wake at 1000 s finds b idle (put to sleep at once); b's finds a running until 1100 + wake.
    assert sorted(shared.woken_waits.tolist()) == pytest.approx(
        [wake, wake + (1000.0 + wake + 100.0 - 1050.0)]
    )
    alone = coldstart.fencing_check(trace, result, sleepers_per_gpu=1)
    assert alone.delayed == 0
