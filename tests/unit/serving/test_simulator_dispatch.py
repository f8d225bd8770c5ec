"""The simulator dispatches as vllm-router's round_robin policy does (the ServingPool default)."""

from __future__ import annotations

import numpy as np

from ampacity.serving import hardware
from ampacity.serving.latency import LatencyModel
from ampacity.serving.simulator import Colocated, Disaggregated, simulate
from ampacity.serving.workload import Workload

SPEC, GPU = hardware.model("llama2-70b"), hardware.gpu("h100")


def _long_then_short() -> Workload:
    # One long prompt, then short ones arriving while it is still being prefilled.
    prompts = np.array([8000, 100, 100, 100, 100, 100])
    return Workload("t", np.array([0.0, 0.01, 0.02, 0.03, 0.04, 0.05]), prompts, np.full(6, 10))


def test_prompts_go_to_prefill_engines_in_turn_whatever_their_load() -> None:
    # With two prefill engines, requests 2 and 4 queue behind the long prompt on engine 0 (a
    # load-aware dispatch would send every short prompt to the idle engine 1).
    pool = Disaggregated(2, 2, 4, 1, 50e9)
    result = simulate(pool, _long_then_short(), SPEC, GPU)
    long_prefill = LatencyModel(SPEC, GPU, 2).prefill_time(8000, 8000**2)
    behind = result.ttft[[2, 4]] + np.array([0.02, 0.04])
    assert np.all(behind > long_prefill)
    assert np.all(result.ttft[[1, 3, 5]] < long_prefill / 4)
    assert (result.completions == 1).all()


def test_colocated_instances_take_requests_in_turn() -> None:
    pool = Colocated(2, 2)
    result = simulate(pool, _long_then_short(), SPEC, GPU)
    long_prefill = LatencyModel(SPEC, GPU, 2).prefill_time(8000, 8000**2)
    assert np.all(result.ttft[[2, 4]] + np.array([0.02, 0.04]) > long_prefill)
    assert np.all(result.ttft[[1, 3, 5]] < long_prefill / 4)


def test_decode_engines_are_picked_in_arrival_order() -> None:
    # vllm-router picks a request's decode engine when the request arrives, not when its prefill
    # ends. Requests 1, 3 and 5 finish their prefill (on engine 1) before 0, 2 and 4 (behind the
    # long prompt on engine 0), yet 0, 2 and 4 share decode engine 0 and 1, 3 and 5 engine 1.
    workload = _long_then_short()
    pool = Disaggregated(2, 2, 4, 2, 50e9)
    result = simulate(pool, workload, SPEC, GPU)
    peak = result.kv_peak
    footprint = workload.prompts + workload.outputs
    assert peak[0] == footprint[[0, 2, 4]].sum()
    assert peak[1] == footprint[[1, 3, 5]].sum()
