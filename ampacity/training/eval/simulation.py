"""Replay real node faults against checkpoint policies and count the GPU-time each wastes.

A gang-scheduled job of N nodes is placed on random nodes of the InfiniteHBD cluster;
every fault on one of its nodes (from the trace, not a synthetic distribution) stops
the gang, which restarts after `restart_seconds` from the latest complete checkpoint.
Checkpoints are asynchronous: training stalls `stall_seconds`, and the checkpoint is
complete `persist_seconds` later; a fault before that tears it. Over the horizon the
wall time splits exactly into useful work + checkpoint stalls + lost (redone) work +
restart downtime, and the last three, times the job's GPUs, are the waste compared.

Policies: `fixed` (every hour, the common default), `oracle` (Daly's interval for the
job's true MTBF over the replay, known only in hindsight) and `auto` (our policy: Daly
on an MTBF learned online from the failures seen so far pooled with a prior).

The prior comes from an earlier window of the trace than the replay (by default days
0-100 for the prior, 100-200 replayed), so `auto` is not tuned on the faults it is
scored on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ampacity.training.checkpoint_interval import (
    SECONDS_PER_HOUR,
    FailureRatePrior,
    auto_interval,
    choose_interval,
)
from ampacity.training.failure_trace import FailureTrace

#: (failures observed so far, wall seconds elapsed) -> checkpoint interval in seconds.
IntervalFn = Callable[[int, float], float]


@dataclass(frozen=True)
class JobConfig:
    nodes: int = 256
    gpus_per_node: int = 8
    stall_seconds: float = 10.0
    persist_seconds: float = 120.0
    restart_seconds: float = 600.0


@dataclass
class Waste:
    """Seconds of wall time (whole job) lost to each cause, and the counts behind them."""

    checkpoint_seconds: float = 0.0
    lost_seconds: float = 0.0
    restart_seconds: float = 0.0
    useful_seconds: float = 0.0
    failures: int = 0
    checkpoints: int = 0

    @property
    def total_seconds(self) -> float:
        return self.checkpoint_seconds + self.lost_seconds + self.restart_seconds

    def add(self, other: Waste) -> None:
        self.checkpoint_seconds += other.checkpoint_seconds
        self.lost_seconds += other.lost_seconds
        self.restart_seconds += other.restart_seconds
        self.useful_seconds += other.useful_seconds
        self.failures += other.failures
        self.checkpoints += other.checkpoints


def simulate_run(failures_s: np.ndarray, horizon_s: float, job: JobConfig, interval: IntervalFn) -> Waste:
    """One job over `horizon_s` wall seconds with faults at `failures_s` (sorted).

    The interval counts training time between checkpoint starts and is re-evaluated
    after every checkpoint and every restart. A checkpoint due while the previous one
    is still persisting waits for it (one persist in flight).
    """

    def ask(failures: int, elapsed: float) -> float:
        seconds = interval(failures, elapsed)
        if not seconds > 0:
            raise ValueError(f"checkpoint interval must be > 0 s, got {seconds}")
        return seconds

    waste = Waste()
    faults = [float(f) for f in failures_s if f < horizon_s]
    fi = 0
    t = 0.0
    progress = 0.0  # training seconds since the job started, as the model state holds them
    committed = 0.0  # progress in the latest complete checkpoint
    since = 0.0  # training seconds since the last checkpoint start or restart
    pending: tuple[float, float] | None = None  # (progress saved, wall time it completes)
    tau = ask(0, 0.0)
    while True:
        next_fault = faults[fi] if fi < len(faults) else float("inf")
        due = t + max(0.0, tau - since)
        if pending is not None:
            due = max(due, pending[1])
        done = pending[1] if pending is not None else float("inf")
        now = min(next_fault, horizon_s, due, done)
        progress += now - t
        since += now - t
        t = now
        if now == next_fault:
            # Stop the gang and resume from the latest complete checkpoint; faults during
            # the restart only push its end out.
            waste.lost_seconds += progress - committed
            progress, pending, since = committed, None, 0.0
            end = t
            while fi < len(faults) and faults[fi] <= end:
                end = max(end, faults[fi] + job.restart_seconds)
                waste.failures += 1
                fi += 1
            end = min(end, horizon_s)
            waste.restart_seconds += end - t
            t = end
            if t >= horizon_s:
                break
            tau = ask(waste.failures, t)
        elif now == horizon_s:
            break
        elif pending is not None and now == done:
            committed, pending = pending[0], None
        else:
            stall_end = t + job.stall_seconds
            cut = min(stall_end, next_fault, horizon_s)
            waste.checkpoint_seconds += cut - t
            t = cut
            if cut == stall_end:
                waste.checkpoints += 1
                pending = (progress, t + job.persist_seconds)
                since = 0.0
                tau = ask(waste.failures, t)
    waste.useful_seconds = progress
    return waste


def _constant(seconds: float) -> IntervalFn:
    return lambda _failures, _elapsed: seconds


@dataclass(frozen=True)
class PolicyResult:
    name: str
    waste: Waste
    gpus: int

    @property
    def wasted_gpu_hours(self) -> float:
        return self.waste.total_seconds * self.gpus / SECONDS_PER_HOUR


@dataclass(frozen=True)
class Comparison:
    job: JobConfig
    trials: int
    horizon_hours: float
    true_mtbf_hours: float  # over all trials: job-hours per failure in the replay
    prior_mtbf_hours: float  # what the prior alone predicts for this job
    policies: dict[str, PolicyResult]

    def ratio_to_oracle(self, name: str) -> float:
        return self.policies[name].waste.total_seconds / self.policies["oracle"].waste.total_seconds


def compare_policies(
    trace: FailureTrace,
    job: JobConfig,
    *,
    seed: int = 0,
    trials: int = 20,
    prior_until_days: float = 100.0,
    prior_weight: float = 2.0,
    fixed_interval_seconds: float = SECONDS_PER_HOUR,
) -> Comparison:
    """Waste of `fixed`, `oracle` and `auto` summed over `trials` random placements."""
    prior_trace = trace.window(trace.span_days[0], prior_until_days)
    replay = trace.window(prior_until_days, trace.span_days[1])
    prior = FailureRatePrior.from_trace(
        prior_trace,
        weight=prior_weight,
        source=f"InfiniteHBD days {trace.span_days[0]:g}-{prior_until_days:g}",
    )
    horizon = replay.span_hours * SECONDS_PER_HOUR
    rng = np.random.default_rng(seed)
    totals = {name: Waste() for name in ("fixed", "oracle", "auto")}
    failures_seen = 0
    for _ in range(trials):
        faults = replay.job_failure_hours(replay.sample_job_nodes(job.nodes, rng)) * SECONDS_PER_HOUR
        true_mtbf = horizon / max(len(faults), 1)
        failures_seen += len(faults)
        oracle = choose_interval(
            stall_seconds=job.stall_seconds, persist_seconds=job.persist_seconds, mtbf_seconds=true_mtbf
        ).interval_seconds

        def auto(failures: int, elapsed: float) -> float:
            return auto_interval(
                stall_seconds=job.stall_seconds,
                persist_seconds=job.persist_seconds,
                nodes=job.nodes,
                prior=prior,
                observed_failures=failures,
                exposure_node_hours=job.nodes * elapsed / SECONDS_PER_HOUR,
            ).interval_seconds

        policies: dict[str, IntervalFn] = {
            "fixed": _constant(fixed_interval_seconds),
            "oracle": _constant(oracle),
            "auto": auto,
        }
        for name, fn in policies.items():
            totals[name].add(simulate_run(faults, horizon, job, fn))
    gpus = job.nodes * job.gpus_per_node
    return Comparison(
        job=job,
        trials=trials,
        horizon_hours=replay.span_hours,
        true_mtbf_hours=trials * replay.span_hours / max(failures_seen, 1),
        prior_mtbf_hours=SECONDS_PER_HOUR / (job.nodes * prior.rate_per_node_hour) / SECONDS_PER_HOUR,
        policies={name: PolicyResult(name, waste, gpus) for name, waste in totals.items()},
    )
