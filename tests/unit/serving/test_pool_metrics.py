"""A pool's metrics from every engine: per-engine differencing, counter resets, new and gone engines."""

from __future__ import annotations

import pytest

from ampacity.serving.replan import (
    Histogram,
    MetricsSnapshot,
    observe_pool,
    parse_metrics,
    pool_increase,
)


def _text(requests: float, prompt: float, ttft_fast: float, ttft_total: float) -> str:
    return f"""# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="length",model_name="m"}} {requests}
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="m"}} 0.0
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="m"}} {prompt}
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m"}} 2.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.5",model_name="m"}} {ttft_fast}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="1.0",model_name="m"}} {ttft_total}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model_name="m"}} {ttft_total}
vllm:time_to_first_token_seconds_count{{engine="0",model_name="m"}} {ttft_total}
vllm:time_to_first_token_seconds_sum{{engine="0",model_name="m"}} 1.0
"""


def test_parse_reads_vllm_exposition_with_prometheus_clients_parser() -> None:
    snapshot = parse_metrics(_text(10, 1000, 6, 10), time=5.0)
    assert (snapshot.requests, snapshot.prompt_tokens, snapshot.running) == (10, 1000, 2)
    assert snapshot.ttft.buckets == ((0.5, 6), (1.0, 10), (float("inf"), 10))
    assert snapshot.ttft.fraction_within(0.5) == pytest.approx(0.6)
    assert snapshot.ttft.fraction_within(0.75) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        parse_metrics("vllm:request_success_total{unclosed 1\n", time=0)


def test_a_restarted_engine_is_not_a_fall_in_the_pools_rate() -> None:
    before = {
        "a": parse_metrics(_text(100, 10000, 50, 100), 0),
        "b": parse_metrics(_text(40, 4000, 20, 40), 0),
    }
    # Engine b restarted during the interval and has served 5 requests since; a served 20 more.
    after = {"a": parse_metrics(_text(120, 12000, 60, 120), 10), "b": parse_metrics(_text(5, 500, 5, 5), 10)}
    delta = pool_increase(before, after)
    assert delta.requests == 25 and delta.prompt_tokens == 2500
    assert delta.ttft.count == 25
    observed = observe_pool(before, after, elapsed=10)
    assert observed.rate == pytest.approx(2.5)
    # A merged (summed) pool counter would have fallen from 140 to 125: the naive rate is wrong.
    assert (120 + 5) - (100 + 40) < 0


def test_new_engines_count_from_their_start_and_gone_ones_stop_counting() -> None:
    before = {"a": parse_metrics(_text(10, 100, 5, 10), 0), "gone": parse_metrics(_text(99, 990, 9, 99), 0)}
    after = {"a": parse_metrics(_text(14, 140, 7, 14), 4), "new": parse_metrics(_text(3, 30, 3, 3), 4)}
    delta = pool_increase(before, after)
    assert delta.requests == 7 and delta.prompt_tokens == 70
    with pytest.raises(ValueError):
        pool_increase(before, {})


def test_histogram_fraction_within_interpolates_like_prometheus() -> None:
    h = Histogram(((0.1, 10.0), (0.2, 30.0), (float("inf"), 40.0)), 40.0, 5.0)
    assert h.fraction_within(0.05) == pytest.approx(0.125)
    assert h.fraction_within(0.15) == pytest.approx(0.5)
    assert h.fraction_within(10.0) == pytest.approx(0.75)  # the +Inf bucket is not interpolated
    assert Histogram().fraction_within(1.0) is None
    assert MetricsSnapshot(0).ttft.fraction_within(1) is None
