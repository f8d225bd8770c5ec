"""From a ServingPool spec to a plan: the DistServe planner of ampacity.serving, sized for the pool.

The planner finds the pool unit (colocated or prefill/decode) with the most
goodput per GPU; this module picks the unit the spec's mode asks for and
scales it to the peak rate within [minGpus, maxGpus].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ampacity.api.servingpool import ServingMode, ServingPlan, ServingPoolSpec
from ampacity.serving import hardware, planner
from ampacity.serving.lengths import load_profile
from ampacity.serving.planner import PoolPlan
from ampacity.serving.simulator import Colocated, Pool, Slo

#: Requests simulated per candidate pool: enough for a stable 90th percentile, and about a
#: second of planning on one core.
PLANNING_REQUESTS = 600


class PlanningError(ValueError):
    """The spec cannot be planned (unknown model or GPU, or no pool meets the SLOs)."""


@dataclass(frozen=True)
class SizedPlan:
    plan: ServingPlan
    #: Why the pool is smaller than the peak rate needs (maxGpus), or "" when it is not.
    limited_by: str = ""


def plan_pool(spec: ServingPoolSpec) -> SizedPlan:
    try:
        model, gpu = hardware.model(spec.model.name), hardware.gpu(spec.gpu_type)
    except KeyError as error:
        raise PlanningError(str(error.args[0])) from error
    sample = load_profile(spec.workload.profile).workload(PLANNING_REQUESTS, rate=1.0)
    slo = Slo(spec.slo.ttft, spec.slo.tpot)
    plans = planner.plan(model, planner.Cluster(gpu), slo, sample, target=spec.slo.attainment)
    candidates = {
        ServingMode.COLOCATED: plans.colocated,
        ServingMode.DISAGGREGATED: plans.disaggregated,
        ServingMode.AUTO: plans.best if (plans.colocated or plans.disaggregated) else None,
    }
    unit = candidates[ServingMode(spec.mode)]
    if unit is None:
        raise PlanningError(
            f"no {spec.mode} pool of {model.name} on {gpu.name} meets TTFT {spec.slo.ttft:g}s and "
            f"TPOT {spec.slo.tpot * 1000:g}ms for {spec.slo.attainment:.0%} of requests"
        )
    if unit.gpus > spec.max_gpus:
        raise PlanningError(
            f"the smallest pool that meets the SLOs needs {unit.gpus} GPUs; maxGpus is {spec.max_gpus}"
        )

    # Enough units for the peak rate and for minGpus, then as many as maxGpus allows.
    wanted_rate = max(
        spec.workload.peak_rate or unit.goodput, unit.goodput * math.ceil(spec.min_gpus / unit.gpus)
    )
    rate, limited_by = wanted_rate, ""
    pool = planner.replicas_for_rate(unit, rate)
    while pool.gpus > spec.max_gpus:
        rate *= 0.95
        pool = planner.replicas_for_rate(unit, rate)
        limited_by = f"maxGpus {spec.max_gpus} caps the pool below the {wanted_rate:.3g} req/s it needs"
    colocated_goodput = plans.colocated.goodput_per_gpu if plans.colocated else 0.0
    return SizedPlan(_serving_plan(unit, pool, colocated_goodput), limited_by)


def _serving_plan(unit: PoolPlan, pool: Pool, colocated_goodput: float) -> ServingPlan:
    capacity = unit.goodput_per_gpu * pool.gpus
    common = {
        "gpus": pool.gpus,
        "predicted_goodput": round(unit.goodput_per_gpu, 4),
        "predicted_attainment": round(unit.attainment, 4),
        "colocated_goodput": round(colocated_goodput, 4),
        "capacity": round(capacity, 3),
    }
    if isinstance(pool, Colocated):
        return ServingPlan(
            mode=ServingMode.COLOCATED,
            prefill_tensor_parallel=pool.tp,
            prefill_replicas=pool.instances,
            **common,
        )
    return ServingPlan(
        mode=ServingMode.DISAGGREGATED,
        prefill_tensor_parallel=pool.prefill_tp,
        prefill_replicas=pool.prefill_instances,
        decode_tensor_parallel=pool.decode_tp,
        decode_replicas=pool.decode_instances,
        **common,
    )
