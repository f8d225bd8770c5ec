import itertools
import math

import pytest

from ampacity.training.checkpoint_interval import (
    FailureRatePrior,
    auto_interval,
    choose_interval,
    daly_interval,
    estimate_failure_rate,
    fixed_interval,
    young_interval,
)
from ampacity.training.failure_trace import load_failure_trace

PRIOR = FailureRatePrior(rate_per_node_hour=1e-4, weight=2.0, source="test prior")


def test_young_is_sqrt_two_delta_m() -> None:
    assert young_interval(10.0, 86_400.0) == pytest.approx(math.sqrt(2 * 10 * 86_400))


def test_daly_refines_young_for_small_stall_and_caps_at_mtbf() -> None:
    young = young_interval(10.0, 86_400.0)
    daly = daly_interval(10.0, 86_400.0)
    assert young - 10.0 < daly < young  # the higher-order terms are small, minus the stall
    assert daly_interval(5_000.0, 2_000.0) == 2_000.0  # stall >= 2 MTBF: checkpoint once per MTBF


@pytest.mark.parametrize("mtbf", [600.0, 3_600.0, 86_400.0, 1e7])
def test_daly_increases_with_stall(mtbf: float) -> None:
    stalls = [0.01 * 1.5**i for i in range(40)]
    intervals = [daly_interval(s, mtbf) for s in stalls if s < 2 * mtbf]
    assert all(b > a for a, b in itertools.pairwise(intervals))


@pytest.mark.parametrize("stall", [0.1, 10.0, 300.0])
def test_daly_increases_with_mtbf(stall: float) -> None:
    mtbfs = [stall * 1.5**i for i in range(1, 40)]
    intervals = [daly_interval(stall, m) for m in mtbfs]
    assert all(b >= a for a, b in itertools.pairwise(intervals))


def test_auto_interval_shrinks_as_failures_are_observed() -> None:
    intervals = [
        auto_interval(
            stall_seconds=20.0,
            persist_seconds=30.0,
            nodes=64,
            prior=PRIOR,
            observed_failures=k,
            exposure_node_hours=10_000.0,
        ).interval_seconds
        for k in range(10)
    ]
    assert all(b < a for a, b in itertools.pairwise(intervals))


def test_auto_interval_grows_with_save_cost_and_shrinks_with_job_size() -> None:
    def interval(stall: float, nodes: int) -> float:
        return auto_interval(
            stall_seconds=stall,
            persist_seconds=0.0,
            nodes=nodes,
            prior=PRIOR,
            observed_failures=0,
            exposure_node_hours=0.0,
        ).interval_seconds

    assert interval(5.0, 64) < interval(20.0, 64) < interval(80.0, 64)
    assert interval(20.0, 16) > interval(20.0, 64) > interval(20.0, 256)


def test_async_floor_is_the_persist_time() -> None:
    free = choose_interval(stall_seconds=1.0, persist_seconds=0.0, mtbf_seconds=20_000.0)
    floored = choose_interval(stall_seconds=1.0, persist_seconds=1_800.0, mtbf_seconds=20_000.0)
    assert free.interval_seconds < 1_800.0
    assert floored.interval_seconds == 1_800.0
    assert "persist" in floored.reason
    assert "Daly optimum" in free.reason


def test_bounds_apply_and_are_explained() -> None:
    low = choose_interval(stall_seconds=0.0, persist_seconds=0.0, mtbf_seconds=100.0, min_seconds=60.0)
    high = choose_interval(stall_seconds=600.0, persist_seconds=0.0, mtbf_seconds=1e9, max_seconds=7_200.0)
    assert low.interval_seconds == 60.0 and "minimum" in low.reason
    assert high.interval_seconds == 7_200.0 and "maximum" in high.reason


def test_estimator_moves_from_prior_to_observed_rate() -> None:
    assert estimate_failure_rate(
        PRIOR, observed_failures=0, exposure_node_hours=0.0
    ).rate_per_node_hour == pytest.approx(PRIOR.rate_per_node_hour)
    # 1000 failures in 1e6 node-hours (ten times the prior rate) against the prior's 2 failures
    # in 2e4 node-hours: the posterior mean pools both and sits near the observed rate.
    rich = estimate_failure_rate(PRIOR, observed_failures=1_000, exposure_node_hours=1e6)
    assert rich.rate_per_node_hour == pytest.approx((2 + 1_000) / (2e4 + 1e6))
    assert rich.rate_per_node_hour == pytest.approx(1e-3, rel=0.02)
    assert rich.mtbf_seconds(10) == pytest.approx(3_600.0 / (10 * rich.rate_per_node_hour))


def test_prior_from_the_infinitehbd_trace() -> None:
    trace = load_failure_trace()
    prior = FailureRatePrior.from_trace(trace, weight=3.0)
    assert prior.rate_per_node_hour == pytest.approx(len(trace.faults) / (400 * 200 * 24))
    decision = auto_interval(
        stall_seconds=10.0,
        persist_seconds=60.0,
        nodes=256,
        prior=prior,
        observed_failures=0,
        exposure_node_hours=0.0,
    )
    assert decision.interval_seconds == pytest.approx(
        daly_interval(10.0, 3_600.0 / (256 * prior.rate_per_node_hour))
    )
    assert "3 pseudo-failures" in decision.reason


def test_fixed_interval_and_validation() -> None:
    assert fixed_interval(3_600.0).interval_seconds == 3_600.0
    assert "fixed" in fixed_interval(3_600.0).reason
    with pytest.raises(ValueError):
        fixed_interval(0.0)
    with pytest.raises(ValueError):
        estimate_failure_rate(PRIOR, observed_failures=-1, exposure_node_hours=0.0)
