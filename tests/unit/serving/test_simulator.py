from __future__ import annotations

import numpy as np
import pytest

from ampacity.serving.hardware import gpu, model
from ampacity.serving.latency import LatencyModel
from ampacity.serving.simulator import Colocated, Disaggregated, Pool, SimResult, Slo, simulate
from ampacity.serving.workload import Workload, synthetic

SPEC, HW = model("llama2-70b"), gpu("h100")
NVLINK_X4 = 4 * HW.nvlink_bandwidth

POOLS: list[Pool] = [
    Disaggregated(prefill_tp=4, prefill_instances=1, decode_tp=4, decode_instances=1, kv_bandwidth=NVLINK_X4),
    # TP2 decode holds ~50k KV tokens: the cache, not the batch size, limits it.
    Disaggregated(prefill_tp=2, prefill_instances=2, decode_tp=2, decode_instances=2, kv_bandwidth=12.5e9),
    Colocated(tp=4, instances=2),
    Colocated(tp=2, instances=1),
]


@pytest.fixture(scope="module")
def busy(azure: Workload) -> Workload:
    """400 Azure requests at 12 req/s: queues, full batches and full KV caches for these pools."""
    return azure.head(400).at_rate(12.0)


@pytest.fixture(scope="module")
def results(busy: Workload) -> list[SimResult]:
    return [simulate(pool, busy, SPEC, HW) for pool in POOLS]


def test_every_request_finishes_once(results: list[SimResult]) -> None:
    for result in results:
        assert np.all(result.completions == 1)
        assert np.all(np.isfinite(result.finish))


def test_ttft_is_at_least_the_prefill(results: list[SimResult]) -> None:
    for result in results:
        assert np.all(result.ttft >= result.prefill_alone * (1 - 1e-12))
        assert np.all(result.prefill_alone > 0)


def test_tokens_take_at_least_a_decode_step(busy: Workload, results: list[SimResult]) -> None:
    for pool, result in zip(POOLS, results, strict=True):
        tp = pool.tp if isinstance(pool, Colocated) else pool.decode_tp
        fastest_step = LatencyModel(SPEC, HW, tp).decode_time(1, 0)
        decoding = busy.outputs > 1
        assert np.all(result.tpot[decoding] >= fastest_step)
        assert np.all(result.tpot[~decoding] == 0)


def test_kv_cache_never_overflows_and_is_used(results: list[SimResult]) -> None:
    for result in results:
        assert np.all(result.kv_peak <= result.kv_capacity)
    # The TP2 pools run with their caches nearly full, so the limit is exercised.
    for result in (results[1], results[3]):
        assert result.kv_peak.max() > 0.8 * result.kv_capacity.max()


def test_deterministic(busy: Workload, results: list[SimResult]) -> None:
    again = simulate(POOLS[1], busy, SPEC, HW)
    assert np.array_equal(again.ttft, results[1].ttft)
    assert np.array_equal(again.tpot, results[1].tpot)


def test_slower_kv_transfer_costs_ttft_not_tpot(azure: Workload) -> None:
    # The client's first token comes from the decode engine, after the pull: a slow link delays
    # it by at least the extra pull time on average, and leaves the gaps after it alone.
    work = azure.head(200).at_rate(2.0)
    fast = simulate(Disaggregated(4, 1, 4, 1, NVLINK_X4), work, SPEC, HW)
    slow = simulate(Disaggregated(4, 1, 4, 1, 1e9), work, SPEC, HW)
    lm = LatencyModel(SPEC, HW, 4)
    extra = np.mean([lm.kv_transfer_bytes(p) for p in work.prompts.tolist()]) * (1 / 1e9 - 1 / NVLINK_X4)
    assert np.mean(slow.ttft) - np.mean(fast.ttft) >= extra
    assert np.mean(slow.tpot) == pytest.approx(np.mean(fast.tpot), rel=0.05)


def test_colocation_interferes_with_decoding(azure: Workload) -> None:
    # Long prompts at a moderate rate: in a colocated pool every prefill stalls the decodes.
    long_prompts = Workload("long", azure.arrivals[:300], np.full(300, 6000), azure.outputs[:300]).at_rate(
        1.5
    )
    colocated = simulate(Colocated(4, 2), long_prompts, SPEC, HW)
    disaggregated = simulate(Disaggregated(4, 1, 4, 1, NVLINK_X4), long_prompts, SPEC, HW)
    assert np.percentile(colocated.tpot, 90) > 1.5 * np.percentile(disaggregated.tpot, 90)
    slo = Slo(ttft=5.0, tpot=0.06)
    assert disaggregated.attainment(slo) > colocated.attainment(slo)


def test_phase_alone_pools(azure: Workload) -> None:
    work = azure.head(100).at_rate(1.0)
    prefill_only = simulate(Disaggregated(4, 1, 4, 0, NVLINK_X4), work, SPEC, HW)
    assert np.array_equal(prefill_only.finish, prefill_only.ttft + work.arrivals)
    decode_only = simulate(Disaggregated(4, 0, 4, 1, NVLINK_X4), work, SPEC, HW)
    # Alone, decode gets each request's KV at arrival: its first token is its first decode pass.
    assert np.all(decode_only.ttft >= LatencyModel(SPEC, HW, 4).decode_time(1, 0))
    assert np.all(decode_only.completions == 1)


def test_rejects_requests_no_instance_can_hold(azure: Workload) -> None:
    huge = Workload("huge", np.array([0.0]), np.array([100_000]), np.array([10]))
    with pytest.raises(ValueError, match="largest request"):
        simulate(Colocated(2, 1), huge, SPEC, HW)
    assert simulate(Colocated(8, 1), huge, SPEC, HW).completions.sum() == 1


def test_burstier_arrivals_lower_attainment(azure: Workload) -> None:
    slo = Slo(ttft=1.0, tpot=0.1)
    smooth = simulate(Colocated(4, 1), synthetic(400, 3.0, azure, burstiness=0.5, seed=3), SPEC, HW)
    bursty = simulate(Colocated(4, 1), synthetic(400, 3.0, azure, burstiness=4.0, seed=3), SPEC, HW)
    assert bursty.attainment(slo) < smooth.attainment(slo)


@pytest.mark.parametrize("pool", [Disaggregated(4, 1, 2, 1, NVLINK_X4), Colocated(4, 1)])
def test_a_lone_request_takes_exactly_its_passes(pool: Pool) -> None:
    prompt, output = 3000, 40
    lone = Workload("lone", np.array([0.0]), np.array([prompt]), np.array([output]))
    result = simulate(pool, lone, SPEC, HW)
    prefill = LatencyModel(SPEC, HW, 4)
    if isinstance(pool, Disaggregated):
        # vllm-router's two stages: the prefill's token is discarded; the client's first token is
        # the decode engine's, after the KV pull and that engine's first pass, and the decode
        # engine then runs one pass per token, each over a context one token longer.
        decode = LatencyModel(SPEC, HW, pool.decode_tp)
        transfer = prefill.kv_transfer_bytes(prompt) / pool.kv_bandwidth
        first = prefill.prefill_time(prompt, prompt**2) + transfer + decode.decode_time(1, prompt)
        steps = sum(decode.decode_time(1, prompt + k) for k in range(1, output))
    else:
        # The prefill pass gives the first token, then one pass per token after it.
        first = prefill.prefill_time(prompt, prompt**2)
        steps = sum(prefill.decode_time(1, prompt + k) for k in range(output - 1))
    assert result.ttft[0] == pytest.approx(first)
    assert result.tpot[0] * (output - 1) == pytest.approx(steps)


def test_a_decode_engine_busy_with_a_pass_delays_the_first_token() -> None:
    # A long decode is running when a short request's KV arrives: its first token waits for the
    # pass in flight, then comes with the next pass, which the two requests share.
    workload = Workload("pair", np.array([0.0, 1.0]), np.array([2000, 100]), np.array([400, 5]))
    pool = Disaggregated(4, 1, 4, 1, NVLINK_X4)
    pair = simulate(pool, workload, SPEC, HW)
    lone = Workload("lone", np.array([0.0]), np.array([100]), np.array([5]))
    alone = simulate(pool, lone, SPEC, HW)
    # The prefill instance is idle again when the short prompt arrives; only decode is shared.
    assert pair.ttft[0] + pair.tpot[0] * 399 > 1.0 + alone.ttft[0]
    decode_step = LatencyModel(SPEC, HW, 4).decode_time(1, 100)
    assert pair.ttft[1] > alone.ttft[0] + decode_step / 2


def test_chunked_prefill_spreads_a_long_prompt_and_spares_the_running_decodes() -> None:
    # A chat request decoding when an 8k-token prompt arrives: whole, the prompt's pass stalls
    # the decode for the whole prefill; in 512-token chunks the decode gets a token every pass.
    workload = Workload("pair", np.array([0.0, 0.5]), np.array([200, 8192]), np.array([400, 2]))
    whole = simulate(Colocated(4, 1), workload, SPEC, HW)
    chunked = simulate(Colocated(4, 1, chunk=512), workload, SPEC, HW)
    assert np.all(chunked.completions == 1)
    lm = LatencyModel(SPEC, HW, 4)
    # The long prompt's first token: after all 16 chunks, later than one whole pass would give.
    assert chunked.ttft[1] > whole.ttft[1] >= lm.prefill_time(8192, 8192**2)
    assert chunked.tpot[0] < whole.tpot[0]
