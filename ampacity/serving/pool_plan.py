"""From a ServingPool spec to a plan: the function the reconciler and `ampacity plan` both call.

The goodput planner (`planner.plan`) finds the pool unit (colocated or prefill/decode) with the
most goodput per GPU; this module resolves the spec's model, GPU, traffic and latency profile into
the planner's inputs, picks the unit the spec's mode asks for and scales it to the peak rate
within [minGpus, maxGpus]. When no latency model can be built (a model the planner does not know
and no architecture, or a GPU outside the catalogue) the pool still gets a plan: the fallback,
colocated, tensor-parallel from GPU memory against the weights, replicas from minGpus. Only a
pool whose weights cannot fit in maxGpus of memory is unplannable.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace

from ampacity.api.gpu_products import known_gpu_names
from ampacity.api.meta import ConditionStatus
from ampacity.api.servingpool import (
    LengthDistribution,
    ServingMode,
    ServingPlan,
    ServingPoolSpec,
    ServingPoolStatus,
)
from ampacity.serving import hardware, planner
from ampacity.serving.hardware import GpuSpec, ModelSpec
from ampacity.serving.latency import MEMORY_UTILIZATION, PROFILED_MODELS
from ampacity.serving.lengths import LengthProfile, distribution_profile, histogram_points, load_profile
from ampacity.serving.planner import PoolPlan
from ampacity.serving.profile_fit import ProfileError, fit_profile, parse_profile
from ampacity.serving.simulator import Colocated, Pool, Slo

#: Requests simulated per candidate pool: enough for a stable 90th percentile.
PLANNING_REQUESTS = 600
GPUS_PER_NODE = 8
#: Share of an instance's memory the fallback leaves for the KV cache beyond the weights.
FALLBACK_KV_SHARE = 0.2
#: Memory assumed per GPU when the GPU type is not in the catalogue.
ASSUMED_GPU_MEMORY = 80 * hardware.GIB

PLANNED = "Planned"
NO_LATENCY_MODEL = "NoLatencyModel"
UNPLANNABLE = "Unplannable"
LATENCY_PROFILE_INVALID = "LatencyProfileInvalid"


class PlanningError(ValueError):
    """The spec cannot be planned; `reason` is the condition reason, the message says why."""

    def __init__(self, message: str, reason: str = UNPLANNABLE) -> None:
        super().__init__(message)
        self.reason = reason


class LatencyProfileError(PlanningError):
    """The latency profile is missing or cannot be read: the pool keeps its last good plan."""

    def __init__(self, message: str) -> None:
        super().__init__(message, LATENCY_PROFILE_INVALID)


@dataclass(frozen=True)
class Alternative:
    """A pool the planner checked and did not choose."""

    pool: str
    mode: str
    gpus: int
    goodput_per_gpu: float
    attainment: float
    why: str


@dataclass(frozen=True)
class SizedPlan:
    plan: ServingPlan
    #: Why the pool is smaller than the peak rate needs (maxGpus), or "" when it is not.
    limited_by: str = ""
    #: PLANNED, or NO_LATENCY_MODEL for the fallback.
    reason: str = PLANNED
    message: str = ""
    alternatives: tuple[Alternative, ...] = ()

    @property
    def planned(self) -> bool:
        return self.reason == PLANNED


def describe(pool: Pool) -> str:
    if isinstance(pool, Colocated):
        chunked = f", chunked prefill {pool.chunk}" if pool.chunk else ""
        return f"{pool.instances} x TP{pool.tp} colocated{chunked}"
    prefill = f"{pool.prefill_instances} x TP{pool.prefill_tp} prefill"
    return f"{prefill} + {pool.decode_instances} x TP{pool.decode_tp} decode"


def resolve_model(spec: ServingPoolSpec) -> ModelSpec | None:
    """The architecture given in the spec, else the built-in entry of that name, else None."""
    if spec.model.architecture is not None:
        return hardware.model_from_config(spec.model.name, spec.model.architecture.config())
    try:
        return hardware.model(spec.model.name)
    except KeyError:
        return None


def resolve_gpu(spec: ServingPoolSpec) -> GpuSpec | None:
    try:
        return hardware.gpu(spec.gpu_type)
    except KeyError:
        return None


def length_profile(spec: ServingPoolSpec) -> LengthProfile:
    """The pool's own length distributions when given, else the named trace profile."""
    workload = spec.workload
    if workload.prompt_tokens is None or workload.output_tokens is None:
        return load_profile(workload.profile)

    def points(distribution: LengthDistribution) -> list[tuple[float, int]]:
        if distribution.percentiles is not None:
            return [(p.percentile, p.tokens) for p in distribution.percentiles]
        return histogram_points([(b.up_to, b.count) for b in distribution.histogram or []])

    return distribution_profile(
        "spec.workload", points(workload.prompt_tokens), points(workload.output_tokens)
    )


_SIZE_IN_NAME = re.compile(r"(?:(\d+)x)?(\d+(?:\.\d+)?)b(?![a-z])", re.IGNORECASE)


def _weights_from_name(name: str) -> float | None:
    """Weight bytes guessed from a size in the model's name (`Llama-3.1-8B`, `Mixtral-8x7B`)."""
    match = _SIZE_IN_NAME.search(name.rsplit("/", 1)[-1])
    if not match:
        return None
    experts = int(match.group(1) or 1)
    return experts * float(match.group(2)) * 1e9 * 2


def _fallback(spec: ServingPoolSpec, model: ModelSpec | None, gpu: GpuSpec | None) -> SizedPlan:
    """Colocated, the smallest TP whose memory holds the weights with KV room, replicas from minGpus."""
    missing = []
    if model is None:
        missing.append(
            f"the planner has no architecture for model {spec.model.name!r}: add spec.model.architecture "
            "(`ampacity serving model-info config.json` prints it from the model's config.json)"
        )
    if gpu is None:
        missing.append(
            f"gpuType {spec.gpu_type!r} is not in the GPU catalogue (known: {', '.join(known_gpu_names())})"
        )
    memory = gpu.memory_bytes if gpu is not None else ASSUMED_GPU_MEMORY
    weights = model.weight_bytes if model is not None else _weights_from_name(spec.model.name)
    if weights is None:
        tp = min(GPUS_PER_NODE, spec.max_gpus)
        sizing = f"weight size unknown (no size in the name): TP {tp}, a node's worth of GPUs"
    else:
        needed = weights * (1 + FALLBACK_KV_SHARE) / (memory * MEMORY_UTILIZATION)
        if weights > spec.max_gpus * memory * MEMORY_UTILIZATION:
            raise PlanningError(
                f"the weights ({weights / 1e9:.0f} GB) do not fit in maxGpus {spec.max_gpus} x "
                f"{memory / hardware.GIB:.0f} GiB"
            )
        fitting = [tp for tp in planner.TP_DEGREES if tp >= needed and tp <= spec.max_gpus]
        if not fitting:
            raise PlanningError(
                f"the weights ({weights / 1e9:.0f} GB) need {math.ceil(needed)} GPUs of "
                f"{memory / hardware.GIB:.0f} GiB in one instance: more than a node, or maxGpus "
                f"{spec.max_gpus}"
            )
        tp = fitting[0]
        sizing = f"TP {tp} holds the ~{weights / 1e9:.0f} GB of weights with {FALLBACK_KV_SHARE:.0%} to spare"
        if gpu is None:
            sizing += f" (assuming {ASSUMED_GPU_MEMORY / hardware.GIB:.0f} GiB per GPU)"
    replicas = max(1, spec.min_gpus // tp)
    plan = ServingPlan(
        mode=ServingMode.COLOCATED,
        prefill_tensor_parallel=tp,
        prefill_replicas=replicas,
        gpus=tp * replicas,
        latency_model="none: fallback plan without SLO prediction",
        latency_model_source="None",
    )
    message = (
        "; ".join(missing) + f". Running the fallback: colocated, {sizing}, {replicas} replicas from minGpus"
    )
    return SizedPlan(plan, reason=NO_LATENCY_MODEL, message=message)


def _fit_gpu(
    spec: ServingPoolSpec, model: ModelSpec, gpu: GpuSpec, profile: str | None
) -> tuple[GpuSpec, float]:
    assert spec.latency_profile is not None
    where = f"latencyProfile ConfigMap {spec.latency_profile.config_map!r}"
    if profile is None:
        raise LatencyProfileError(f"{where} was not found or has no such key")
    try:
        fit = fit_profile(parse_profile(profile, model.name, gpu.name), model, gpu)
    except ProfileError as error:
        raise LatencyProfileError(f"{where}: {error}") from None
    return replace(gpu, calibration=fit.calibration), fit.held_out_median_error


def _mode_of(planned: PoolPlan) -> ServingMode:
    return ServingMode.COLOCATED if isinstance(planned.pool, Colocated) else ServingMode.DISAGGREGATED


def _modes(mode: str) -> tuple[ServingMode, ...]:
    if mode == ServingMode.AUTO:
        return (ServingMode.COLOCATED, ServingMode.DISAGGREGATED)
    return (ServingMode(mode),)


def provenance(model: ModelSpec, gpu: GpuSpec) -> str:
    """Where the latency model of `model` on `gpu` comes from, in words."""
    text = gpu.provenance
    if gpu.calibration is None and model.name not in PROFILED_MODELS:
        text += (
            f"; {model.name} was never profiled (the profiles are of {', '.join(sorted(PROFILED_MODELS))}): "
            "its latencies are its architecture's roofline under those efficiencies"
        )
    return text


def profile_digest(profile: str | None) -> str:
    """What a plan remembers of the latency profile it was fitted to (empty: none could be read)."""
    return hashlib.sha256(profile.encode()).hexdigest() if profile is not None else ""


def plan_pool(spec: ServingPoolSpec, profile: str | None = None) -> SizedPlan:
    """The plan for a pool; `profile` is the text of its latencyProfile ConfigMap key (if it has one)."""
    model, gpu = resolve_model(spec), resolve_gpu(spec)
    if model is None or gpu is None:
        return _fallback(spec, model, gpu)
    fit_error = None
    if spec.latency_profile is not None:
        gpu, fit_error = _fit_gpu(spec, model, gpu, profile)
    lengths = length_profile(spec)
    sample = lengths.workload(PLANNING_REQUESTS, rate=1.0, burstiness=spec.workload.burstiness)
    longest = (max(lengths.longest_prompt, 1), max(lengths.longest_request, 2))
    slo = Slo(spec.slo.ttft, spec.slo.tpot)
    plans = planner.plan_once(
        model, planner.Cluster(gpu, gpus_per_node=GPUS_PER_NODE), slo, sample, spec.slo.attainment, longest
    )
    serving = [c for c in plans.candidates if c.goodput > 0 and _mode_of(c) in _modes(spec.mode)]
    fitting = [c for c in serving if c.gpus <= spec.max_gpus]
    if not fitting:
        if not plans.candidates:
            raise PlanningError(
                f"no tensor-parallel degree up to {GPUS_PER_NODE} holds {model.name}'s weights and the KV "
                f"cache of the longest request ({longest[1]} tokens) on {gpu.name}"
            )
        if serving:
            raise PlanningError(
                f"the smallest pool that meets the SLOs needs {min(c.gpus for c in serving)} GPUs; "
                f"maxGpus is {spec.max_gpus}"
            )
        raise PlanningError(
            f"no {spec.mode} pool of {model.name} on {gpu.name} meets TTFT {spec.slo.ttft:g}s and "
            f"TPOT {spec.slo.tpot * 1000:g}ms for {spec.slo.attainment:.0%} of requests",
            reason="SloUnreachable",
        )
    # The most goodput per GPU among the units maxGpus allows; on a tie the colocated one (one
    # kind of instance, no KV transfers), then the first checked (the smaller TP).
    unit = max(fitting, key=lambda c: (c.goodput_per_gpu, _mode_of(c) == ServingMode.COLOCATED))

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
    served = _serving_plan(unit, pool, colocated_goodput)
    served = served.model_copy(
        update={
            "latency_model": provenance(model, gpu)
            + (f" (held-out median error {fit_error:.1%})" if fit_error is not None else ""),
            "latency_model_source": gpu.provenance_kind,
            "profile_fit_error": round(fit_error, 4) if fit_error is not None else None,
            "longest_request_tokens": longest[1],
            "latency_profile_digest": profile_digest(profile) if spec.latency_profile else "",
        }
    )
    message = (
        f"{describe(unit.pool)} per unit, {unit.goodput_per_gpu:.3g} req/s per GPU at "
        f"{unit.attainment:.0%} attainment; latency model {gpu.provenance_kind.lower()}"
    )
    return SizedPlan(served, limited_by, PLANNED, message, _alternatives(plans, unit, spec))


def _alternatives(
    plans: planner.Plan, chosen: PoolPlan, spec: ServingPoolSpec, keep: int = 3
) -> tuple[Alternative, ...]:
    """The best pools not chosen, and why not."""
    out = []
    for other in sorted(plans.candidates, key=lambda p: -p.goodput_per_gpu):
        if other.pool == chosen.pool:
            continue
        mode = _mode_of(other)
        if other.goodput <= 0:
            why = "meets the SLOs at no request rate"
        elif spec.mode != ServingMode.AUTO and mode != spec.mode:
            why = f"spec.mode is {spec.mode}"
        elif other.gpus > spec.max_gpus:
            why = f"needs {other.gpus} GPUs, maxGpus is {spec.max_gpus}"
        elif other.goodput_per_gpu < chosen.goodput_per_gpu:
            why = f"{other.goodput_per_gpu:.3g} req/s per GPU, below the chosen {chosen.goodput_per_gpu:.3g}"
        else:
            why = "ties the chosen pool; the smaller or colocated pool wins ties"
        out.append(
            Alternative(describe(other.pool), mode, other.gpus, other.goodput_per_gpu, other.attainment, why)
        )
        if len(out) == keep:
            break
    return tuple(out)


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
            prefill_chunk_tokens=pool.chunk,
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


#: Whether the pool runs a plan with predicted SLO attainment (False: fallback, or no plan).
PLANNED_CONDITION = "Planned"
#: Where the plan's latency model comes from (reason: Calibrated, Extrapolated, Fitted or None).
LATENCY_MODEL = "LatencyModel"


def record_plan(status: ServingPoolStatus, sized: SizedPlan, generation: int) -> None:
    """The Planned and LatencyModel conditions of a plan in force."""
    plan = sized.plan
    # A plan kept from an earlier reconcile carries the reason it was recorded with (Planned,
    # NoLatencyModel, or LatencyProfileInvalid for a last good plan kept through a bad profile).
    planned = ConditionStatus.TRUE if sized.reason == PLANNED else ConditionStatus.FALSE
    status.set_condition(PLANNED_CONDITION, planned, sized.reason, sized.message, generation)
    source = plan.latency_model_source or "None"
    status.set_condition(
        LATENCY_MODEL, "True" if source != "None" else "False", source, plan.latency_model, generation
    )


def record_planning_error(status: ServingPoolStatus, error: PlanningError, generation: int) -> bool:
    """The conditions of a spec that could not be planned; True when the last good plan stays in force.

    A latency profile that cannot be read keeps the plan made before (the profile may be mid-edit);
    any other failure leaves the pool without a plan.
    """
    keep = isinstance(error, LatencyProfileError) and status.plan is not None
    if not keep:
        status.plan = None
    reason = LATENCY_PROFILE_INVALID if isinstance(error, LatencyProfileError) else error.reason
    message = str(error) + ("; the last good plan stays in force" if keep else "")
    status.set_condition(PLANNED_CONDITION, "False", reason, message, generation)
    return keep
