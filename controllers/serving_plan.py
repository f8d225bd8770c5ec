"""Turn a ServingPool spec into a plan (to be replaced by the goodput planner of ampacity.serving)."""

from __future__ import annotations

from ampacity.api.servingpool import ServingPlan, ServingPoolSpec

# Parameters (billions) and GPU memory (GiB); fp16 weights take 2 bytes per parameter.
_MODEL_PARAMS_B = {"llama2-7b": 7, "llama2-13b": 13, "llama2-70b": 70, "bloom-176b": 176}
_GPU_MEMORY_GIB = {"a100": 80, "h100": 80, "h200": 141}


class PlanningError(ValueError):
    """The spec names something the planner cannot plan for."""


def plan_pool(spec: ServingPoolSpec) -> ServingPlan:
    params = _MODEL_PARAMS_B.get(spec.model.name)
    memory = _GPU_MEMORY_GIB.get(spec.gpu_type)
    if params is None or memory is None:
        raise PlanningError(f"no profile for model {spec.model.name!r} on GPU {spec.gpu_type!r}")
    tp = 1
    while params * 2 > 0.8 * memory * tp:
        tp *= 2
    if tp > spec.max_gpus:
        raise PlanningError(f"{spec.model.name} needs {tp} {spec.gpu_type} GPUs; maxGpus is {spec.max_gpus}")
    replicas = max(1, spec.min_gpus // tp)
    return ServingPlan(
        mode="colocated", prefill_tensor_parallel=tp, prefill_replicas=replicas, gpus=replicas * tp
    )
