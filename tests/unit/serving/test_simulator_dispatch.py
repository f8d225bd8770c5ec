"""Round-robin dispatch (vllm-router's round_robin policy) in the simulator."""

from __future__ import annotations

import numpy as np

from ampacity.serving import hardware
from ampacity.serving.simulator import Disaggregated, Limits, simulate
from ampacity.serving.workload import Workload


def test_round_robin_ignores_load_and_least_loaded_does_not() -> None:
    # One long prompt, then short ones arriving while it is still being prefilled.
    prompts = np.array([8000, 100, 100, 100, 100, 100])
    workload = Workload("t", np.array([0.0, 0.01, 0.02, 0.03, 0.04, 0.05]), prompts, np.full(6, 10))
    pool = Disaggregated(2, 2, 4, 1, 50e9)
    spec, gpu = hardware.model("llama2-70b"), hardware.gpu("h100")
    least = simulate(pool, workload, spec, gpu)
    turns = simulate(pool, workload, spec, gpu, Limits(round_robin=True))
    # Round robin sends every other short prompt behind the long one; least-loaded sends none.
    assert turns.ttft[1:].max() > least.ttft[1:].max()
    assert (turns.completions == 1).all() and (least.completions == 1).all()
