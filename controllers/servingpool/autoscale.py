"""ServingPool autoscaling: from the engines' live vLLM metrics to instances per phase.

Between plans, `ampacity.serving.replan.decide` resizes each phase (hysteresis and
a cool-down against flapping); on top of it the pool scales to zero after
`scaleToZeroAfter` without a request, and back to the planned size when
requests come again. `next_size` is pure; the reconciler scrapes every engine pod (or the one
`metricsUrl`), and each engine's counters are differenced on their own (`replan.pool_increase`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from datetime import datetime

import numpy as np

from ampacity.api.meta import format_duration
from ampacity.api.servingpool import AutoscalingStatus, ServingPlan, ServingPoolSpec
from ampacity.serving.lengths import load_profile
from ampacity.serving.planner import PoolPlan
from ampacity.serving.replan import (
    MetricsSnapshot,
    Observation,
    PlannedMix,
    ReplanConfig,
    ReplanState,
    decide,
    observe_pool,
)
from ampacity.serving.simulator import Colocated, Disaggregated, Pool, Slo


def _pool(plan: ServingPlan, prefill: int, decode: int) -> Pool:
    if plan.mode == "colocated":
        return Colocated(plan.prefill_tensor_parallel, prefill)
    # The KV bandwidth only matters to the simulator; resizing keeps the planned shape.
    return Disaggregated(plan.prefill_tensor_parallel, prefill, plan.decode_tensor_parallel, decode, math.inf)


def _counts(pool: Pool) -> tuple[int, int]:
    if isinstance(pool, Colocated):
        return pool.instances, 0
    return pool.prefill_instances, pool.decode_instances


def _state_from_json(text: str) -> ReplanState | None:
    if not text:
        return None
    raw = json.loads(text)
    marks = tuple((float(t), tuple(int(n) for n in counts)) for t, counts in raw.get("lower_marks", ()))
    return ReplanState(since=raw.get("since"), lower_marks=marks, scaled_up_at=raw.get("scaled_up_at"))


def planned_size(plan: ServingPlan) -> AutoscalingStatus:
    return AutoscalingStatus(
        prefill_replicas=plan.prefill_replicas, decode_replicas=plan.decode_replicas, reason="planned size"
    )


Scrape = dict[str, MetricsSnapshot]
"""One scrape of the pool: each engine's (pod's) snapshot, by pod name."""


def observation(before: Scrape | None, after: Scrape) -> Observation | None:
    """The pool's rates between two scrapes, engine by engine (None: no rates yet)."""
    if not before or not after:
        return None
    elapsed = max(s.time for s in after.values()) - max(s.time for s in before.values())
    return observe_pool(before, after, elapsed) if elapsed > 0 else None


def busy(scrape: Scrape) -> bool:
    return any(s.running > 0 or s.waiting > 0 for s in scrape.values())


def next_size(
    spec: ServingPoolSpec,
    plan: ServingPlan,
    previous: AutoscalingStatus | None,
    before: Scrape | None,
    after: Scrape,
    now: datetime,
) -> AutoscalingStatus:
    """Instances per phase for the next interval, from two scrapes of the pool's engines."""
    assert spec.autoscaling is not None
    last = previous if previous is not None else planned_size(plan)
    observed = observation(before, after)
    if observed is None:
        # One scrape gives no rates; the creation of the pool counts as activity.
        return last.model_copy(update={"last_request_time": last.last_request_time or now})
    active = observed.rate > 0 or busy(after)
    last_request = now if active else (last.last_request_time or now)
    idle_for = (now - last_request).total_seconds()
    zero_after = spec.autoscaling.scale_to_zero_after
    common = {"observed_rate": round(observed.rate, 3), "last_request_time": last_request}

    if zero_after is not None and idle_for >= zero_after:
        reason = f"no request for {format_duration(round(idle_for))}: scaled to zero"
        return AutoscalingStatus(prefill_replicas=0, decode_replicas=0, reason=reason, **common)
    prefill, decode = last.prefill_replicas, last.decode_replicas
    if prefill == 0 and active:
        # Waking from zero: back to the planned size, then let the re-planner adjust.
        prefill, decode = plan.prefill_replicas, plan.decode_replicas
    profile = load_profile(spec.workload.profile)
    decision = decide(
        PoolPlan(
            _pool(plan, plan.prefill_replicas, plan.decode_replicas), plan.capacity, plan.predicted_attainment
        ),
        _pool(plan, prefill, decode),
        observed,
        now.timestamp(),
        _state_from_json(last.state),
        ReplanConfig(
            slo=Slo(spec.slo.ttft, spec.slo.tpot),
            cooldown_seconds=spec.autoscaling.cooldown,
            min_gpus=spec.min_gpus,
            max_gpus=spec.max_gpus,
        ),
        PlannedMix(float(np.mean(profile.prompts)), float(np.mean(profile.outputs))),
    )
    new_prefill, new_decode = _counts(decision.pool)
    return AutoscalingStatus(
        prefill_replicas=new_prefill,
        decode_replicas=new_decode,
        reason=decision.reason,
        state=json.dumps(asdict(decision.state)),
        **common,
    )
