from __future__ import annotations

import numpy as np
import pytest

from ampacity.serving.hardware import gpu, model
from ampacity.serving.planner import (
    Cluster,
    Plan,
    PoolPlan,
    goodput,
    plan,
    replicas_for_rate,
    steady_attainment,
)
from ampacity.serving.simulator import Colocated, Disaggregated, Slo, simulate
from ampacity.serving.workload import Workload

SPEC, HW = model("llama2-70b"), gpu("h100")
CLUSTER = Cluster(HW, gpus_per_node=8)


@pytest.fixture(scope="module")
def long_prompts(azure: Workload) -> Workload:
    """DistServe's winning case: long prompts (Azure arrivals and outputs, prompts x4)."""
    sample = azure.head(300)
    return Workload("long", sample.arrivals, sample.prompts * 4, sample.outputs)


@pytest.fixture(scope="module")
def tight(long_prompts: Workload) -> Plan:
    return plan(SPEC, CLUSTER, Slo(ttft=4.0, tpot=0.05), long_prompts)


@pytest.fixture(scope="module")
def loose(long_prompts: Workload) -> Plan:
    return plan(SPEC, CLUSTER, Slo(ttft=4.0, tpot=0.1), long_prompts)


def test_disaggregation_wins_with_tight_tpot_and_long_prompts(tight: Plan) -> None:
    assert tight.disaggregated is not None and tight.colocated is not None
    assert tight.disaggregated.goodput_per_gpu >= tight.colocated.goodput_per_gpu
    assert tight.best is tight.disaggregated


def test_tighter_tpot_never_plans_higher_goodput(tight: Plan, loose: Plan) -> None:
    assert tight.best.goodput_per_gpu <= loose.best.goodput_per_gpu
    for pair in ((tight.disaggregated, loose.disaggregated), (tight.colocated, loose.colocated)):
        assert pair[0] is not None and pair[1] is not None
        assert pair[0].goodput_per_gpu <= pair[1].goodput_per_gpu


def test_goodput_of_a_pool_is_monotone_in_the_slo(long_prompts: Workload) -> None:
    pool = Colocated(4, 2)
    rates = [goodput(pool, long_prompts, SPEC, HW, Slo(4.0, tpot))[0] for tpot in (0.04, 0.06, 0.1, 0.2)]
    assert rates == sorted(rates)
    assert rates[-1] > rates[0]


def test_plan_meets_the_target_at_its_goodput(long_prompts: Workload, tight: Plan) -> None:
    best = tight.best
    assert best.attainment >= 0.9
    result = simulate(best.pool, long_prompts.at_rate(best.goodput), SPEC, HW)
    assert steady_attainment(result, Slo(ttft=4.0, tpot=0.05)) == best.attainment


def test_impossible_slo_has_no_goodput(long_prompts: Workload) -> None:
    # No 4k-token prefill on 4 H100s finishes in 10 ms.
    assert goodput(Colocated(4, 1), long_prompts.head(50), SPEC, HW, Slo(0.01, 1.0)) == (0.0, 0.0)


def test_kv_in_node_keeps_units_inside_a_node(long_prompts: Workload) -> None:
    constrained = plan(SPEC, Cluster(HW, gpus_per_node=8, kv_in_node=True), Slo(4.0, 0.05), long_prompts)
    assert constrained.disaggregated is not None
    pool = constrained.disaggregated.pool
    assert isinstance(pool, Disaggregated)
    assert pool.gpus <= 8
    assert pool.kv_bandwidth == min(pool.prefill_tp, pool.decode_tp) * HW.nvlink_bandwidth


def test_replicas_for_rate_scales_each_phase(tight: Plan) -> None:
    planned = tight.best
    assert replicas_for_rate(planned, planned.goodput) == planned.pool
    sizes = [replicas_for_rate(planned, r).gpus for r in np.linspace(0.1, 10, 25) * planned.goodput]
    assert sizes == sorted(sizes)
    big = replicas_for_rate(planned, 3 * planned.goodput)
    assert isinstance(big, Disaggregated) and isinstance(planned.pool, Disaggregated)
    assert big.prefill_instances == 3 * planned.pool.prefill_instances
    assert big.decode_instances == 3 * planned.pool.decode_instances
    colocated = PoolPlan(Colocated(4, 2), goodput=2.0, attainment=0.95)
    assert replicas_for_rate(colocated, 5.0) == Colocated(4, 5)
    with pytest.raises(ValueError):
        replicas_for_rate(colocated, 0.0)


def test_replicas_for_rate_serves_the_rate(long_prompts: Workload, tight: Plan) -> None:
    rate = 2.5 * tight.best.goodput
    pool = replicas_for_rate(tight.best, rate)
    result = simulate(pool, long_prompts.at_rate(rate), SPEC, HW)
    assert steady_attainment(result, Slo(ttft=4.0, tpot=0.05)) >= 0.9


@pytest.mark.usefixtures("traces_present")
def test_a_plan_from_a_small_sample_serves_the_whole_trace() -> None:
    # `serving bench --sample 50` used to size TP on the sample's longest prompt, then crash on the
    # trace's 191k-token request. Planned for the trace's longest request, every pool holds it.
    from ampacity.serving.cli import _planning_sample
    from ampacity.serving.workload import load_trace

    trace = load_trace("mooncake")
    sample, longest = _planning_sample(trace, 50)
    assert longest == (int(trace.prompts.max()), int((trace.prompts + trace.outputs).max()))
    result = plan(SPEC, CLUSTER, Slo(ttft=10.0, tpot=0.1), sample, longest=longest)
    longest_request = trace.head(int(np.argmax(trace.prompts)) + 1)
    assert result.candidates
    for candidate in result.candidates:
        # Raises if an instance cannot hold the trace's longest request.
        done = simulate(candidate.pool, longest_request.at_rate(0.05), SPEC, HW)
        assert np.all(done.completions == 1)


@pytest.mark.usefixtures("traces_present")
def test_planning_samples_keep_the_traces_burstiness() -> None:
    from ampacity.serving.lengths import arrival_burstiness
    from ampacity.serving.workload import load_trace

    trace = load_trace("azure-conv")
    thinned = trace.thin(2000)
    warped = thinned.with_burstiness(arrival_burstiness(trace))
    assert arrival_burstiness(thinned) < 0.6 * arrival_burstiness(trace)  # thinning smooths the gaps
    assert arrival_burstiness(warped) == pytest.approx(arrival_burstiness(trace), rel=0.15)
    # The rate over time survives: requests per 3-minute bin follow the thinned trace's.
    bins = np.linspace(0, 1, 21)
    counts = [np.histogram(w.arrivals / w.duration, bins)[0] for w in (thinned, warped)]
    assert np.corrcoef(counts[0], counts[1])[0, 1] > 0.7
