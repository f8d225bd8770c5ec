"""How often to checkpoint: Young/Daly from measured save costs and a pooled failure rate.

A checkpoint every `tau` seconds of training costs the save stall `delta` each time and,
on a failure, the work since the last complete checkpoint plus the restart. Minimising
that waste gives Young's first-order interval sqrt(2 * delta * M) for an MTBF of M
(J. W. Young, "A first order approximation to the optimum checkpoint interval", CACM
1974) and Daly's higher-order refinement (J. T. Daly, "A higher order estimate of the
optimum checkpoint interval for restart dumps", FGCS 2006), which is what we use.

Asynchronous (two-phase) checkpointing, as in CheckFreq (Mohan et al., FAST 2021) and
DataStates-LLM (Maurya et al., HPDC 2024), splits the cost: only the snapshot into host
memory stalls training (`delta`); the persist to storage (`P`) runs in the background.
A checkpoint taken at time t is complete only at t + delta + P, so a failure in that
window rolls back one interval further. That adds the constant delta + P to the
expected rework, which does not move the optimum, so the interval is still Daly's in
the stall alone; but at most one persist may be in flight (a second would compete for
the same bandwidth and host buffers), so the interval is at least P.

The restart time R adds R per failure whatever the interval, so it does not move the
optimum either; it only enters the expected waste.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ampacity.training.failure_trace import FailureTrace

SECONDS_PER_HOUR = 3600.0


def young_interval(stall_seconds: float, mtbf_seconds: float) -> float:
    """Young's first-order optimum: sqrt(2 * stall * MTBF)."""
    _check_positive(stall_seconds=stall_seconds, mtbf_seconds=mtbf_seconds)
    return math.sqrt(2.0 * stall_seconds * mtbf_seconds)


def daly_interval(stall_seconds: float, mtbf_seconds: float) -> float:
    """Daly's higher-order optimum (compute time between checkpoints).

    tau = sqrt(2 d M) * (1 + sqrt(d / 2M) / 3 + (d / 2M) / 9) - d  for d < 2M, else M.
    It is increasing in both the stall d and the MTBF M on d < 2M.
    """
    _check_positive(stall_seconds=stall_seconds, mtbf_seconds=mtbf_seconds)
    if stall_seconds >= 2.0 * mtbf_seconds:
        return mtbf_seconds
    x = stall_seconds / (2.0 * mtbf_seconds)
    young = math.sqrt(2.0 * stall_seconds * mtbf_seconds)
    return young * (1.0 + math.sqrt(x) / 3.0 + x / 9.0) - stall_seconds


@dataclass(frozen=True)
class IntervalDecision:
    """The checkpoint interval in force and why (the controller writes both to status)."""

    interval_seconds: float
    reason: str


def choose_interval(
    *,
    stall_seconds: float,
    persist_seconds: float,
    mtbf_seconds: float,
    mtbf_source: str = "",
    min_seconds: float = 60.0,
    max_seconds: float = 24 * SECONDS_PER_HOUR,
) -> IntervalDecision:
    """Daly's interval for the measured stall, floored at the persist time (async variant).

    `min_seconds` / `max_seconds` bound it against nonsense measurements (a zero stall
    would otherwise ask for continuous checkpoints); the persist floor wins over the
    maximum because a shorter interval cannot be carried out.
    """
    if persist_seconds < 0:
        raise ValueError("persist_seconds must be >= 0")
    stall = max(stall_seconds, 1e-3)
    daly = daly_interval(stall, mtbf_seconds)
    interval, why = daly, "Daly optimum"
    if interval < min_seconds:
        interval, why = min_seconds, f"raised to the {_fmt_s(min_seconds)} minimum"
    if interval > max_seconds:
        interval, why = max_seconds, f"capped at the {_fmt_s(max_seconds)} maximum"
    if interval < persist_seconds:
        interval, why = persist_seconds, "raised to the persist time (async: one persist in flight)"
    source = f" ({mtbf_source})" if mtbf_source else ""
    reason = (
        f"auto: {_fmt_s(interval)}, {why}; Daly interval {_fmt_s(daly)} from save stall {_fmt_s(stall)}, "
        f"persist {_fmt_s(persist_seconds)} and MTBF {_fmt_s(mtbf_seconds)}{source}"
    )
    return IntervalDecision(interval, reason)


def fixed_interval(seconds: float) -> IntervalDecision:
    """A declared fixed interval, in the same shape as the automatic one."""
    _check_positive(seconds=seconds)
    return IntervalDecision(seconds, f"fixed: {_fmt_s(seconds)} as declared")


@dataclass(frozen=True)
class FailureRatePrior:
    """A gamma prior on the per-node failure rate: `weight` pseudo-failures at `rate_per_node_hour`.

    The exposure it stands for is weight / rate node-hours, so a weight of 2 means the
    prior counts as much as two failures the job saw itself.
    """

    rate_per_node_hour: float
    weight: float
    source: str

    @classmethod
    def from_trace(cls, trace: FailureTrace, *, weight: float = 2.0, source: str = "") -> FailureRatePrior:
        """The fleet-wide per-node rate of a fault trace, down-weighted to `weight` failures.

        The trace holds hundreds of faults, but of another fleet: counted at full weight
        it would drown the job's own evidence, so only its rate is kept.
        """
        _check_positive(weight=weight)
        rate = trace.node_failure_rate_per_hour()
        return cls(rate, weight, source or f"{len(trace.faults)} faults on {trace.cluster_nodes} nodes")

    def with_history(self, failures: int, exposure_node_hours: float, source: str = "") -> FailureRatePrior:
        """This prior updated by a cluster's own history: `failures` gang failures the operator saw
        over `exposure_node_hours` of its jobs' node-hours (the gamma posterior, which serves every
        job of that cluster as its prior). Their failures count at full weight: it is this fleet."""
        if failures < 0 or exposure_node_hours < 0:
            raise ValueError("failures and exposure must be >= 0")
        if failures == 0 and exposure_node_hours == 0:
            return self
        weight = self.weight + failures
        rate = weight / (self.weight / self.rate_per_node_hour + exposure_node_hours)
        history = source or f"{failures} failures in {exposure_node_hours:.0f} node-h on this cluster"
        return FailureRatePrior(rate, weight, f"{self.source} + {history}")


@dataclass(frozen=True)
class FailureRateEstimate:
    """Posterior mean per-node failure rate and the evidence behind it."""

    rate_per_node_hour: float
    observed_failures: int
    exposure_node_hours: float
    prior: FailureRatePrior

    def mtbf_seconds(self, nodes: int) -> float:
        """MTBF of a gang of `nodes` nodes: any node's failure stops it."""
        _check_positive(nodes=nodes)
        return SECONDS_PER_HOUR / (nodes * self.rate_per_node_hour)

    def describe(self, nodes: int) -> str:
        return (
            f"{nodes} nodes x {self.rate_per_node_hour * 1e3:.3g} failures per 1000 node-h: "
            f"prior {self.prior.weight:g} pseudo-failures from {self.prior.source} "
            f"+ {self.observed_failures} observed in {self.exposure_node_hours:.4g} node-h"
        )


def estimate_failure_rate(
    prior: FailureRatePrior, *, observed_failures: int, exposure_node_hours: float
) -> FailureRateEstimate:
    """Gamma-Poisson pooling of the prior with the job's own restarts.

    With a Gamma(a0, b0) prior on the per-node rate (a0 = prior weight, b0 = a0 / prior
    rate node-hours) and k failures seen over T node-hours, the posterior is
    Gamma(a0 + k, b0 + T) with mean (a0 + k) / (b0 + T): the prior rate while the job is
    young, the job's own rate once its evidence outweighs the prior. Exposure is counted
    in node-hours so an elastic resize keeps the evidence comparable.
    """
    if observed_failures < 0 or exposure_node_hours < 0:
        raise ValueError("observed failures and exposure must be >= 0")
    a0 = prior.weight
    b0 = prior.weight / prior.rate_per_node_hour
    rate = (a0 + observed_failures) / (b0 + exposure_node_hours)
    return FailureRateEstimate(rate, observed_failures, exposure_node_hours, prior)


def auto_interval(
    *,
    stall_seconds: float,
    persist_seconds: float,
    nodes: int,
    prior: FailureRatePrior,
    observed_failures: int,
    exposure_node_hours: float,
    min_seconds: float = 60.0,
    max_seconds: float = 24 * SECONDS_PER_HOUR,
) -> IntervalDecision:
    """The `auto` policy: pooled failure rate, then Daly with the async floor.

    The controller calls this whenever the trainer reports a new stall / persist
    measurement or a restart is recorded.
    """
    estimate = estimate_failure_rate(
        prior, observed_failures=observed_failures, exposure_node_hours=exposure_node_hours
    )
    return choose_interval(
        stall_seconds=stall_seconds,
        persist_seconds=persist_seconds,
        mtbf_seconds=estimate.mtbf_seconds(nodes),
        mtbf_source=estimate.describe(nodes),
        min_seconds=min_seconds,
        max_seconds=max_seconds,
    )


def _fmt_s(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * SECONDS_PER_HOUR:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / SECONDS_PER_HOUR:.3g} h"


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
