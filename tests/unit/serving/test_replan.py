from __future__ import annotations

import numpy as np
import pytest

from ampacity.serving import replan
from ampacity.serving.eval import replay
from ampacity.serving.hardware import gpu, model
from ampacity.serving.planner import PoolPlan
from ampacity.serving.replan import Observation, PlannedMix, ReplanConfig, ReplanState
from ampacity.serving.simulator import Colocated, Disaggregated, Slo
from ampacity.serving.workload import Workload

# 3 x TP2 prefill + 1 x TP4 decode serving 10 req/s of 1000-token prompts and 200-token answers.
PLANNED = PoolPlan(Disaggregated(2, 3, 4, 1, 12.5e9), goodput=10.0, attainment=0.92)
MIX = PlannedMix(prompt=1000.0, output=200.0)
SLO = Slo(ttft=1.0, tpot=0.1)


def _seen(rate: float, prompt: float = 1000.0, output: float = 200.0, **latency: float) -> Observation:
    return Observation(rate, rate * prompt, rate * output, **latency)


def _counts(decision: replan.ReplanDecision) -> tuple[int, int]:
    pool = decision.pool
    assert isinstance(pool, Disaggregated)
    return pool.prefill_instances, pool.decode_instances


def test_demand_over_capacity_scales_both_phases_at_once() -> None:
    decision = replan.decide(PLANNED, PLANNED.pool, _seen(20.0), now=0.0, mix=MIX)
    # Each phase loaded to 90% of the plan's rate: prefill ceil(3·20/9), decode ceil(20/9).
    assert _counts(decision) == (7, 3)
    assert "demand over capacity" in decision.reason
    assert decision.state.scaled_up_at == 0.0


def test_longer_prompts_scale_prefill_only() -> None:
    decision = replan.decide(PLANNED, PLANNED.pool, _seen(8.0, prompt=3000.0), now=0.0, mix=MIX)
    assert _counts(decision) == (8, 1)


def test_longer_answers_scale_decode_only() -> None:
    decision = replan.decide(PLANNED, PLANNED.pool, _seen(8.0, output=600.0), now=0.0, mix=MIX)
    assert _counts(decision) == (3, 3)


def test_without_token_rates_the_request_rate_sizes_both_phases() -> None:
    decision = replan.decide(PLANNED, PLANNED.pool, Observation(rate=20.0), now=0.0)
    assert _counts(decision) == (7, 3)


def test_scale_down_waits_for_a_whole_cooldown() -> None:
    pool = Disaggregated(2, 7, 4, 3, 12.5e9)
    config = ReplanConfig(cooldown_seconds=300.0)
    state = ReplanState()
    for now in range(0, 300, 30):
        decision = replan.decide(PLANNED, pool, _seen(2.0), float(now), state, config, MIX)
        assert _counts(decision) == (7, 3), now
        state = decision.state
    decision = replan.decide(PLANNED, pool, _seen(2.0), 300.0, state, config, MIX)
    assert _counts(decision) == (1, 1)
    assert "below the lower mark" in decision.reason


def test_a_lull_between_bursts_does_not_flap() -> None:
    # 8 req/s needs no more than the planned pool; 2 req/s would need one prefill instance, but the
    # 8 req/s seen within the cool-down keeps the lower mark at the planned size.
    state, pool = ReplanState(), PLANNED.pool
    for step in range(40):
        decision = replan.decide(
            PLANNED, pool, _seen(8.0 if step % 4 == 0 else 2.0), 30.0 * step, state, mix=MIX
        )
        assert decision.pool == PLANNED.pool, (step, decision.reason)
        state, pool = decision.state, decision.pool


def test_latency_misses_grow_the_late_phase_when_it_is_busy() -> None:
    config = ReplanConfig(slo=SLO)
    late = replan.decide(PLANNED, PLANNED.pool, _seen(9.0, ttft=2.0, tpot=0.05), 0.0, config=config, mix=MIX)
    assert _counts(late) == (4, 1)
    assert "p90 latency over SLO" in late.reason
    slow_decode = replan.decide(PLANNED, PLANNED.pool, _seen(9.0, tpot=0.2), 0.0, config=config, mix=MIX)
    assert _counts(slow_decode) == (3, 2)
    # At 1 req/s the phase is idle: a long TTFT is the prompts' own and more instances won't help.
    idle = replan.decide(PLANNED, PLANNED.pool, _seen(1.0, ttft=5.0), 0.0, config=config, mix=MIX)
    assert _counts(idle) == (3, 1)


def test_latency_misses_right_after_a_scale_up_wait_for_it_to_settle() -> None:
    config = ReplanConfig(slo=SLO, settle_seconds=60.0)
    state = ReplanState(scaled_up_at=0.0)
    seen = _seen(9.0, ttft=2.0)
    assert _counts(replan.decide(PLANNED, PLANNED.pool, seen, 30.0, state, config, MIX)) == (3, 1)
    assert _counts(replan.decide(PLANNED, PLANNED.pool, seen, 60.0, state, config, MIX)) == (4, 1)


def test_gpu_limits() -> None:
    capped = replan.decide(PLANNED, PLANNED.pool, _seen(50.0), 0.0, config=ReplanConfig(max_gpus=20), mix=MIX)
    assert capped.pool.gpus <= 20
    assert min(_counts(capped)) >= 1
    assert "capped at 20 GPUs" in capped.reason
    floor = replan.decide(PLANNED, PLANNED.pool, _seen(9.0), 0.0, config=ReplanConfig(min_gpus=16), mix=MIX)
    assert floor.pool.gpus >= 16


def test_colocated_pool_grows_on_either_phase() -> None:
    planned = PoolPlan(Colocated(2, 4), goodput=8.0, attainment=0.9)
    config = ReplanConfig(slo=SLO)
    decision = replan.decide(planned, planned.pool, _seen(7.5, tpot=0.3), 0.0, config=config, mix=MIX)
    assert decision.pool == Colocated(2, 5)
    bigger = replan.decide(planned, planned.pool, _seen(4.0, output=800.0), 0.0, config=config, mix=MIX)
    assert bigger.pool == Colocated(2, 9)  # decode demand 16 req/s of the planned mix


def test_config_rejects_a_lower_mark_above_the_upper() -> None:
    with pytest.raises(ValueError):
        ReplanConfig(headroom=0.4, scale_down_headroom=0.2)


def _exposition(requests: float, prompt: float, output: float, ttft: list[float], itl: bool = False) -> str:
    bounds = ["0.1", "0.5", "1.0", "+Inf"]
    tpot_name = "vllm:inter_token_latency_seconds" if itl else "vllm:time_per_output_token_seconds"
    lines = [
        "# HELP vllm:num_requests_running Number of requests currently running on GPU.",
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{model_name="llama"} 3.0',
        'vllm:num_requests_waiting{model_name="llama"} 1.0',
        "# TYPE vllm:request_success_total counter",
        f'vllm:request_success_total{{finished_reason="stop",model_name="llama"}} {requests * 0.9}',
        f'vllm:request_success_total{{finished_reason="length",model_name="llama"}} {requests * 0.1}',
        f'vllm:prompt_tokens_total{{model_name="llama"}} {prompt}',
        f'vllm:generation_tokens_total{{model_name="llama"}} {output}',
    ]
    for bound, count in zip(bounds, ttft, strict=True):
        lines.append(f'vllm:time_to_first_token_seconds_bucket{{le="{bound}",model_name="llama"}} {count}')
        lines.append(f'{tpot_name}_bucket{{le="{bound}",model_name="llama"}} {count}')
    lines += [
        f'vllm:time_to_first_token_seconds_count{{model_name="llama"}} {ttft[-1]}',
        'vllm:time_to_first_token_seconds_sum{model_name="llama"} 12.5',
    ]
    return "\n".join(lines) + "\n"


def test_parse_vllm_metrics() -> None:
    snapshot = replan.parse_metrics(_exposition(100, 1e5, 2e4, [50, 80, 95, 100]), time=10.0)
    assert snapshot.requests == pytest.approx(100.0)
    assert (snapshot.prompt_tokens, snapshot.output_tokens) == (1e5, 2e4)
    assert (snapshot.running, snapshot.waiting) == (3.0, 1.0)
    assert snapshot.ttft.buckets == ((0.1, 50.0), (0.5, 80.0), (1.0, 95.0), (float("inf"), 100.0))
    assert snapshot.ttft.count == 100.0
    assert snapshot.tpot.buckets == snapshot.ttft.buckets
    # vLLM v1 names the TPOT histogram inter-token latency.
    v1 = replan.parse_metrics(_exposition(100, 1e5, 2e4, [50, 80, 95, 100], itl=True), time=10.0)
    assert v1.tpot.buckets == snapshot.ttft.buckets


def test_requests_fall_back_to_the_e2e_histogram_count() -> None:
    text = 'vllm:e2e_request_latency_seconds_count{model_name="m"} 42\n'
    assert replan.parse_metrics(text, 0.0).requests == 42.0


def test_observe_rates_and_quantiles_between_scrapes() -> None:
    before = replan.parse_metrics(_exposition(100, 1e5, 2e4, [50, 80, 95, 100]), time=0.0)
    after = replan.parse_metrics(_exposition(200, 2e5, 4e4, [100, 160, 185, 200]), time=10.0)
    seen = replan.observe(before, after)
    assert seen.rate == pytest.approx(10.0)
    assert seen.prompt_tokens_rate == pytest.approx(1e4)
    assert seen.output_tokens_rate == pytest.approx(2e3)
    # Deltas: 50 <= 0.1 s, 80 <= 0.5 s, 90 <= 1 s of 100: p90 is the top of the third bucket.
    assert seen.ttft == pytest.approx(1.0)
    delta = after.ttft.minus(before.ttft)
    assert delta.quantile(0.5) == pytest.approx(0.1)
    assert delta.quantile(0.65) == pytest.approx(0.3)
    assert delta.quantile(0.95) == pytest.approx(1.0)  # in +Inf: the largest finite bound
    assert replan.Histogram().quantile(0.9) is None


def test_counter_resets_count_from_zero() -> None:
    before = replan.parse_metrics(_exposition(1000, 1e6, 2e5, [500, 800, 950, 1000]), time=0.0)
    after = replan.parse_metrics(_exposition(30, 3e4, 6e3, [10, 20, 25, 30]), time=10.0)
    seen = replan.observe(before, after)
    assert seen.rate == pytest.approx(3.0)
    assert seen.ttft == after.ttft.quantile(0.9)


def test_merge_sums_engines() -> None:
    a = replan.parse_metrics(_exposition(100, 1e5, 2e4, [50, 80, 95, 100]), time=5.0)
    b = replan.parse_metrics(_exposition(50, 5e4, 1e4, [10, 20, 40, 50]), time=6.0)
    merged = replan.merge([a, b])
    assert merged.time == 6.0
    assert merged.requests == pytest.approx(150.0)
    assert merged.ttft.buckets[-1] == (float("inf"), 150.0)
    with pytest.raises(ValueError):
        replan.merge([])


def _lengths() -> Workload:
    n = 64
    return Workload("fixed", np.arange(n, dtype=np.float64), np.full(n, 500), np.full(n, 100))


def test_bursty_trace_follows_its_segments() -> None:
    segments = [replay.Segment(300, 1.0), replay.Segment(300, 8.0, prompt_scale=2.0)]
    trace = replay.bursty(_lengths(), segments, burstiness=2.0, ramp=60.0, seed=1)
    first = trace.arrivals < 300
    assert 150 < first.sum() < 450
    assert 1800 < (~first).sum() < 3000
    assert set(trace.prompts[first].tolist()) == {500}
    assert set(trace.prompts[~first].tolist()) == {1000}
    assert np.array_equal(replay.bursty(_lengths(), segments, 2.0, 60.0, seed=1).arrivals, trace.arrivals)


def test_replan_replay_scales_up_for_a_burst_with_fewer_gpu_hours_than_static_peak() -> None:
    spec, hw = model("llama2-70b"), gpu("h100")
    planned = PoolPlan(Disaggregated(2, 1, 4, 1, 12.5e9), goodput=2.0, attainment=0.9)
    segments = [replay.Segment(240, 1.0), replay.Segment(120, 6.0), replay.Segment(240, 1.0)]
    trace = replay.bursty(_lengths(), segments, burstiness=1.0, ramp=0.0, seed=2)
    config = ReplanConfig(slo=SLO, cooldown_seconds=120.0)
    dynamic = replay.replay_replan(planned, PlannedMix(500, 100), trace, spec, hw, 30.0, config)
    gpus = [w.gpus for w in dynamic.windows]
    assert max(gpus[8:12]) > gpus[0]
    assert gpus[-1] < max(gpus)  # and back down after the burst
    # A scale-up decided at the end of a window serves one window later (startup).
    grow = next(i for i in range(1, len(gpus)) if gpus[i] > gpus[i - 1])
    assert dynamic.windows[grow].serving.gpus < gpus[grow]
    # Static peak: sized for the busiest window with no headroom, the cheapest pool that holds it.
    static = replay.replay_static(replay.static_peak(planned, trace, 30.0), trace, spec, hw, SLO, 30.0)
    assert {w.gpus for w in static.windows} == {24}
    assert dynamic.gpu_hours < static.gpu_hours
    assert dynamic.requests == static.requests == len(trace)


def test_a_latency_driven_size_holds_for_a_cooldown() -> None:
    # A pool that has run for a while. At 7 req/s the rates ask for 3 prefill instances (the lower
    # mark too), but a TTFT miss grows prefill to 4; when the demand drops, that measured need
    # holds for a cool-down before the rate model may shrink the phase again.
    config = ReplanConfig(slo=SLO, cooldown_seconds=300.0)
    state = ReplanState(since=-1000.0)
    decision = replan.decide(PLANNED, PLANNED.pool, _seen(7.0, ttft=2.0), 0.0, state, config, MIX)
    assert _counts(decision) == (4, 1)
    pool, state = decision.pool, decision.state
    for now in range(30, 300, 30):
        decision = replan.decide(PLANNED, pool, _seen(2.0), float(now), state, config, MIX)
        assert _counts(decision) == (4, 1), now
        state = decision.state
    assert _counts(replan.decide(PLANNED, pool, _seen(2.0), 300.0, state, config, MIX)) == (1, 1)


def test_on_steady_traffic_replanning_never_costs_more_than_static_peak() -> None:
    # Steady Poisson traffic near the planned unit's rate: a latency trigger can overshoot here,
    # and starting from one unit ramps; with the static peak pool as start and ceiling neither can
    # cost GPU-hours over static peak provisioning.
    spec, hw = model("llama2-70b"), gpu("h100")
    planned = PoolPlan(Disaggregated(2, 1, 4, 1, 12.5e9), goodput=2.0, attainment=0.9)
    trace = replay.bursty(_lengths(), [replay.Segment(600, 3.0)], burstiness=1.0, seed=3)
    config = ReplanConfig(slo=SLO, cooldown_seconds=120.0)
    ceiling = replay.static_peak(planned, trace, 30.0)
    static = replay.replay_static(ceiling, trace, spec, hw, SLO, 30.0)
    capped = replay.replay_replan(
        planned, PlannedMix(500, 100), trace, spec, hw, 30.0, config, ceiling=ceiling
    )
    assert max(w.gpus for w in capped.windows) <= ceiling.gpus
    assert capped.windows[0].serving == ceiling
    assert capped.gpu_hours <= static.gpu_hours
    assert capped.requests == static.requests == len(trace)
