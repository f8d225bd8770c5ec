from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from ampacity.serving import keepalive
from ampacity.serving.eval import coldstart
from ampacity.serving.keepalive import IdleTimeHistogram, KeepAliveDecision, KeepAlivePolicy


def _histogram(idle_seconds: list[float]) -> IdleTimeHistogram:
    histogram = IdleTimeHistogram()
    for idle in idle_seconds:
        histogram = histogram.record(idle)
    return histogram


def test_histogram_bins_minutes_and_counts_out_of_bounds() -> None:
    h = _histogram([0.0, 59.9, 60.0, 3 * 3600.0, 4 * 3600.0, 5 * 3600.0, -3.0])
    assert h.bins == 240
    assert h.counts[0] == 3  # 0, 59.9 and the negative overlap
    assert h.counts[1] == 1
    assert h.counts[180] == 1
    assert h.out_of_bounds == 2
    assert h.total == 7
    assert h.recent[-1] == 0.0


def test_record_leaves_the_histogram_it_was_called_on_unchanged() -> None:
    empty = IdleTimeHistogram()
    empty.record(30.0)
    assert empty.total == 0


def test_cv_separates_concentrated_from_spread_idle_times() -> None:
    concentrated = _histogram([600.0] * 50)
    spread = _histogram([60.0 * i + 1 for i in range(240)])
    # One full bin among 240: the CV is sqrt(bins), whatever the count.
    assert concentrated.cv() == pytest.approx(math.sqrt(240), rel=1e-9)
    assert spread.cv() == pytest.approx(0.0)


def test_percentile_bins() -> None:
    h = _histogram([60.0 * i + 1 for i in range(100)])
    assert h.percentile_bin(5) == 4
    assert h.percentile_bin(99) == 98
    assert h.percentile_bin(100) == 99


def test_periodic_pool_is_prewarmed_before_and_kept_past_its_period() -> None:
    # Requests every ~30 min: scale to zero, load again just before the next one.
    decision = keepalive.decide(_histogram([30 * 60.0 + s for s in range(0, 40, 2)]))
    assert decision.reason == keepalive.HISTOGRAM
    assert decision.prewarm_seconds == pytest.approx(30 * 60 * 0.9)
    assert decision.warm_until == pytest.approx(31 * 60 * 1.1)
    assert decision.prewarm_seconds < 30 * 60 < decision.warm_until


def test_too_few_samples_and_flat_histograms_fall_back_to_a_fixed_keepalive() -> None:
    policy = KeepAlivePolicy(fallback_keepalive=600.0)
    few = keepalive.decide(_histogram([300.0] * 5), policy)
    assert few == KeepAliveDecision(0.0, 600.0, keepalive.TOO_FEW_SAMPLES)
    flat = keepalive.decide(_histogram([60.0 * i + 1 for i in range(240)]), policy)
    assert flat == KeepAliveDecision(0.0, 600.0, keepalive.LOW_CV)
    # The paper's fallback: keep alive for the whole range.
    assert keepalive.decide(_histogram([])).keepalive_seconds == 4 * 3600


def test_out_of_bounds_idle_times_use_the_forecast_with_15_percent_margins() -> None:
    decision = keepalive.decide(_histogram([6 * 3600.0] * 12))
    assert decision.reason == keepalive.OUT_OF_BOUNDS
    assert decision.prewarm_seconds == pytest.approx(6 * 3600 * 0.85, rel=1e-6)
    assert decision.warm_until == pytest.approx(6 * 3600 * 1.15, rel=1e-6)


def test_forecast_follows_an_alternating_series() -> None:
    # AR(1) on the logs picks up the alternation that a mean would blur.
    series = tuple([600.0, 6000.0] * 10)
    assert keepalive.forecast_idle(series) == pytest.approx(600.0, rel=0.05)
    assert keepalive.forecast_idle((100.0, 100.0, 100.0)) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        keepalive.forecast_idle(())


def test_scale_to_zero_before_the_prewarm_and_after_the_keepalive() -> None:
    decision = KeepAliveDecision(prewarm_seconds=1000.0, keepalive_seconds=500.0, reason="test")
    startup = 100.0
    assert keepalive.scale_to_zero(decision, 800.0, startup)
    assert not keepalive.scale_to_zero(decision, 900.0, startup)  # loading for the window
    assert not keepalive.scale_to_zero(decision, 1499.0, startup)
    assert keepalive.scale_to_zero(decision, 1500.0, startup)
    assert keepalive.requeue_after(decision, 0.0, startup) == 900.0
    assert keepalive.requeue_after(decision, 1000.0, startup) == 500.0
    assert keepalive.requeue_after(decision, 2000.0, startup) is None
    # No pre-warm: the replica that served stays for the keep-alive.
    assert not keepalive.scale_to_zero(keepalive.fixed(600.0), 0.0)
    assert keepalive.scale_to_zero(keepalive.fixed(600.0), 600.0)


def _model(arrivals: list[float], execution: float = 10.0, load: float = 20.0) -> coldstart.ModelRequests:
    n = len(arrivals)
    return coldstart.ModelRequests("m", np.array(arrivals), np.full(n, execution), np.full(n, load))


def test_fixed_keepalive_replay_counts_cold_starts_and_idle_time() -> None:
    # Gaps after each execution: 290 s (warm under 10 min), then 1990 s (cold).
    requests = _model([0.0, 320.0, 2330.0])
    colds, waited, idle, _ = coldstart.replay_model(requests, 600.0, startup=20.0)
    assert colds == 2  # the first request and the one after the long gap
    assert waited == 40.0
    assert idle == pytest.approx(290.0 + 600.0)


def test_hybrid_prewarms_a_periodic_model_that_fixed_10_min_misses() -> None:
    arrivals = [1800.0 * i for i in range(60)]
    requests = _model(arrivals)
    trace = coldstart.ColdStartTrace((requests,), np.array([20.0]))
    fixed = coldstart.replay(trace, 600.0)
    hybrid = coldstart.replay(trace, KeepAlivePolicy(fallback_keepalive=600.0))
    assert fixed.cold_starts == 60
    # Cold until the histogram holds MIN_SAMPLES idle times, warm after.
    assert hybrid.cold_starts == keepalive.MIN_SAMPLES + 1
    assert hybrid.idle_gpu_seconds < fixed.idle_gpu_seconds
    assert hybrid.decisions[keepalive.HISTOGRAM] == 59 - keepalive.MIN_SAMPLES
    assert hybrid.decisions[coldstart.PREWARMED] == 59 - keepalive.MIN_SAMPLES
    assert coldstart.PREWARMED not in fixed.decisions


def test_fixed_at_idle_matches_the_budget() -> None:
    trace = coldstart.ColdStartTrace((_model([0.0, 100.0, 500.0, 2000.0, 2100.0]),), np.array([20.0]))
    budget = coldstart.replay(trace, 300.0).idle_gpu_seconds
    matched = coldstart.fixed_at_idle(trace, budget)
    assert coldstart.replay(trace, matched).idle_gpu_seconds <= budget
    assert coldstart.replay(trace, matched).cold_starts == coldstart.replay(trace, 300.0).cold_starts


def test_hindsight_bound_covers_the_short_gaps_first() -> None:
    # Gaps of 90 s, 90 s and 3590 s: a 90-s keep-alive covers both short ones and idles 90 s
    # before the long one too (270 s); a smaller budget buys nothing.
    trace = coldstart.ColdStartTrace((_model([0.0, 100.0, 200.0, 3800.0]),), np.array([20.0]))
    assert coldstart.hindsight_bound(trace, 300.0) == (2, 270.0)
    assert coldstart.hindsight_bound(trace, 200.0) == (4, 0.0)


def test_alibaba_trace_loads_per_base_model(traces_present: None) -> None:
    trace = coldstart.load_alibaba_genai()
    assert trace.requests == 13217
    assert len(trace.models) == 76
    assert 20 < trace.expected_startup < 25  # the README's p50 of 22.7 s
    short, long = coldstart.replay(trace, 60.0), coldstart.replay(trace, 3600.0)
    assert short.cold_starts > long.cold_starts
    assert short.idle_gpu_seconds < long.idle_gpu_seconds


def test_cost_aware_keepalive_covers_idle_times_only_when_they_are_worth_it() -> None:
    # Idle times all in the 6th minute: keeping warm to its end costs ~5.5 idle minutes per period.
    h = _histogram([330.0] * 20)
    assert keepalive.cost_aware_end(h, 0.0, cold_start_cost=3600.0) == 360.0
    assert keepalive.cost_aware_end(h, 0.0, cold_start_cost=60.0) == 0.0  # cheaper to start cold
    # Half the periods are long (out of bounds): they idle for the whole window, which doubles its cost.
    mixed = _histogram([330.0] * 10 + [5 * 3600.0] * 10)
    assert keepalive.cost_aware_end(mixed, 0.0, cold_start_cost=600.0) == 0.0
    assert keepalive.cost_aware_end(mixed, 0.0, cold_start_cost=1200.0) == 360.0
    decision = keepalive.decide(h, KeepAlivePolicy(cold_start_cost=3600.0))
    assert decision.reason == keepalive.COST_AWARE
    assert decision.prewarm_seconds == pytest.approx(5 * 60 * 0.9)
    assert decision.warm_until == 360.0


def test_tune_to_idle_finds_the_tail_that_fits_a_budget() -> None:
    arrivals = np.cumsum([0.0] + [70.0 * (1 + i % 7) for i in range(80)]).tolist()
    trace = coldstart.ColdStartTrace((_model(arrivals, execution=5.0),), np.array([20.0]))
    base = KeepAlivePolicy(fallback_keepalive=60.0, min_samples=5)
    budget = coldstart.replay(trace, 300.0).idle_gpu_seconds
    tail = coldstart.tune_to_idle(trace, budget, lambda x: replace(base, tail_percentile=x), 5.0, 99.9)
    assert coldstart.replay(trace, replace(base, tail_percentile=tail)).idle_gpu_seconds <= budget
    assert (
        coldstart.replay(trace, replace(base, tail_percentile=min(99.9, tail + 5))).idle_gpu_seconds > budget
    )
    with pytest.raises(ValueError):
        coldstart.tune_to_idle(trace, 0.0, lambda x: replace(base, tail_percentile=x), 5.0, 99.9)
