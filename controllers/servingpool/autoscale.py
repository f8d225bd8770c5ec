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
from dataclasses import asdict, dataclass
from datetime import datetime

import numpy as np

from ampacity.api.meta import format_duration
from ampacity.api.servingpool import (
    ActivationStatus,
    AutoscalingStatus,
    PoolTier,
    ServingPlan,
    ServingPoolSpec,
    SleepStatus,
)
from ampacity.serving.lengths import load_profile
from ampacity.serving.planner import PoolPlan
from ampacity.serving.replan import (
    QUANTILE,
    MetricsSnapshot,
    Observation,
    PlannedMix,
    ReplanConfig,
    ReplanState,
    decide,
    pool_increase,
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


@dataclass(frozen=True)
class EngineScrape:
    role: str
    """engine (colocated, or the one metricsUrl), prefill or decode."""
    snapshot: MetricsSnapshot


Scrape = dict[str, EngineScrape]
"""One scrape of the pool: each engine's (pod's) role and snapshot, by pod name."""

FIRST_PHASE = ("engine", "prefill")
LAST_PHASE = ("engine", "decode")


def _phase(scrape: Scrape, roles: tuple[str, ...]) -> dict[str, MetricsSnapshot]:
    return {pod: e.snapshot for pod, e in scrape.items() if e.role in roles}


def phase_increase(before: Scrape, after: Scrape, roles: tuple[str, ...]) -> MetricsSnapshot:
    """What the engines of one phase counted between the scrapes (MetricsSnapshot(0) if none)."""
    now = _phase(after, roles)
    return pool_increase(_phase(before, roles), now) if now else MetricsSnapshot(0)


def observation(before: Scrape | None, after: Scrape) -> Observation | None:
    """The pool's rates between two scrapes, engine by engine (None: no rates yet).

    In a disaggregated pool every request passes a prefill and a decode engine, and both count
    it: requests and output tokens are counted where requests end (decode), prompt tokens and
    TTFT where they start (prefill), so nothing is counted twice."""
    if not before or not after:
        return None
    elapsed = max(e.snapshot.time for e in after.values()) - max(e.snapshot.time for e in before.values())
    if elapsed <= 0:
        return None
    first, last = phase_increase(before, after, FIRST_PHASE), phase_increase(before, after, LAST_PHASE)
    return Observation(
        rate=last.requests / elapsed,
        prompt_tokens_rate=first.prompt_tokens / elapsed,
        output_tokens_rate=last.output_tokens / elapsed,
        ttft=first.ttft.quantile(QUANTILE),
        tpot=last.tpot.quantile(QUANTILE),
    )


def busy(scrape: Scrape) -> bool:
    return any(e.snapshot.running > 0 or e.snapshot.waiting > 0 for e in scrape.values())


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


def woken(
    plan: ServingPlan, size: AutoscalingStatus, activation: ActivationStatus | None
) -> AutoscalingStatus:
    """The size once the activator's wake request is heard: a request is held, so the pool counts
    as active from when it asked, and a pool at zero goes back to its planned size, prefill and
    decode together (a disaggregated pool serves only with both). A request already acted on (no
    later than the last request seen) changes nothing."""
    at = activation.wake_requested_at if activation is not None else None
    if at is None or (size.last_request_time is not None and at <= size.last_request_time):
        return size
    update: dict[str, object] = {"last_request_time": at}
    if size.prefill_replicas == 0 and size.decode_replicas == 0:
        assert activation is not None
        update |= {
            "prefill_replicas": plan.prefill_replicas,
            "decode_replicas": plan.decode_replicas,
            "reason": f"woken by the activator ({activation.held_requests} requests held)",
        }
    return size.model_copy(update=update)


def pool_tier(desired: int, ready: int, sleep: SleepStatus | None = None) -> PoolTier:
    """stopped: no engine planned; waking: engines planned, none ready yet; asleep: every ready
    engine asleep; awake: serving."""
    if desired == 0:
        return PoolTier.STOPPED
    if ready == 0:
        return PoolTier.WAKING
    if sleep is not None and sleep.asleep and not sleep.awake:
        return PoolTier.ASLEEP
    return PoolTier.AWAKE
