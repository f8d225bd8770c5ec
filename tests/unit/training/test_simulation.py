import numpy as np
import pytest

from ampacity.training.eval.simulation import IntervalFn, JobConfig, compare_policies, simulate_run
from ampacity.training.failure_trace import load_failure_trace

JOB = JobConfig(nodes=1, gpus_per_node=1, stall_seconds=10.0, persist_seconds=20.0, restart_seconds=50.0)


def constant(seconds: float) -> IntervalFn:
    return lambda _failures, _elapsed: seconds


def test_hand_computed_run() -> None:
    # Checkpoints start at 100 and 210 (complete at 130 and 240); the fault at 250 loses the
    # 30 s since step 200 was saved, the restart takes 50 s, then checkpoints every 110 s
    # (100 training + 10 stall) from 400 to 950: 8 stalls of 10 s in all.
    waste = simulate_run(np.array([250.0]), 1000.0, JOB, constant(100.0))
    assert (waste.failures, waste.checkpoints) == (1, 8)
    assert waste.lost_seconds == pytest.approx(30.0)
    assert waste.restart_seconds == pytest.approx(50.0)
    assert waste.checkpoint_seconds == pytest.approx(80.0)
    assert waste.useful_seconds == pytest.approx(840.0)


def test_a_fault_during_the_persist_tears_the_checkpoint() -> None:
    # The checkpoint started at 100 would complete at 130: the fault at 115 falls back to step 0.
    waste = simulate_run(np.array([115.0]), 200.0, JOB, constant(100.0))
    assert waste.lost_seconds == pytest.approx(105.0)


def test_faults_during_a_restart_extend_it() -> None:
    waste = simulate_run(np.array([300.0, 300.0, 320.0]), 1000.0, JOB, constant(100.0))
    assert waste.failures == 3
    assert waste.restart_seconds == pytest.approx(70.0)  # until 320 + 50


def test_wall_time_is_fully_accounted_on_the_trace() -> None:
    trace = load_failure_trace().window(100, 200)
    faults = trace.job_failure_hours(trace.node_ids()) * 3600
    horizon = trace.span_hours * 3600
    for interval in (120.0, 1800.0, 7200.0):
        waste = simulate_run(faults, horizon, JobConfig(), constant(interval))
        assert waste.useful_seconds + waste.total_seconds == pytest.approx(horizon)
        assert waste.failures == len(faults)


def test_comparison_is_deterministic_for_a_seed() -> None:
    trace = load_failure_trace()
    job = JobConfig(nodes=64)
    a = compare_policies(trace, job, seed=3, trials=3)
    b = compare_policies(trace, job, seed=3, trials=3)
    c = compare_policies(trace, job, seed=4, trials=3)
    assert a == b
    assert a.policies["auto"].waste != c.policies["auto"].waste


def test_auto_wastes_no_more_than_hourly_on_the_trace() -> None:
    result = compare_policies(load_failure_trace(), JobConfig(), seed=0, trials=5)
    auto, fixed, oracle = (result.policies[n] for n in ("auto", "fixed", "oracle"))
    assert auto.waste.failures == fixed.waste.failures == oracle.waste.failures > 0
    assert auto.wasted_gpu_hours <= fixed.wasted_gpu_hours
    assert result.ratio_to_oracle("oracle") == 1.0


def test_a_zero_interval_is_rejected() -> None:
    with pytest.raises(ValueError):
        simulate_run(np.array([]), 100.0, JOB, constant(0.0))
