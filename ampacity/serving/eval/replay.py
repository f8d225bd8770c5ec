"""The re-planning decision replayed in the simulator, window by window, against static peak sizing.

A trace is cut into planning intervals. In each, the pool serves that interval's requests in the
discrete-event simulator (`simulator.simulate`); what the engines would have reported (request and
token rates, p90 TTFT and TPOT) goes to `replan.decide`, whose answer serves the next interval.
Two things keep the replay honest about timing:

- a new instance must load its weights before it serves: a scale-up decided at the end of an
  interval serves only `startup_windows` intervals later, while its GPUs count from the decision;
  a scale-down frees GPUs at once;
- each interval is simulated with the previous interval's requests in front of it, on the same
  pool, so a pool starts an interval loaded rather than empty; only the interval's own requests
  are counted. A backlog longer than one interval is not carried over.

The baseline is static peak provisioning at its leanest: the planned pool sized
(`replicas_for_rate`, no headroom) for the busiest interval's request rate, for the whole trace.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ampacity.serving import replan
from ampacity.serving.hardware import GpuSpec, ModelSpec
from ampacity.serving.planner import PoolPlan, replicas_for_rate
from ampacity.serving.simulator import Colocated, Disaggregated, Pool, Slo, simulate
from ampacity.serving.workload import Workload, synthetic


@dataclass(frozen=True)
class Segment:
    """A stretch of a synthetic trace: its length (s), mean rate (req/s), and a prompt multiplier
    (a shift of the mix towards longer prompts, which only prefill should answer)."""

    seconds: float
    rate: float
    prompt_scale: float = 1.0


def bursty(
    lengths: Workload, segments: Sequence[Segment], burstiness: float, ramp: float = 0.0, seed: int = 0
) -> Workload:
    """Gamma arrivals (`workload.synthetic`) whose rate follows the segments, ramping linearly
    from one segment's rate to the next over `ramp` seconds (0: steps).

    One unit-rate gamma stream is time-warped through the cumulative rate, so the burstiness (the
    CV of the gaps at a steady rate) is the same in every segment.
    """
    ends = np.cumsum([seg.seconds for seg in segments])
    starts = ends - [seg.seconds for seg in segments]
    knots_t, knots_r = [0.0], [segments[0].rate]
    for start, end, seg in zip(starts, ends, segments, strict=True):
        knots_t += [float(start) + min(ramp, seg.seconds), float(end)]
        knots_r += [seg.rate, seg.rate]
    grid = np.arange(0.0, float(ends[-1]) + 1.0, 1.0)
    rate = np.interp(grid, knots_t, knots_r)
    cumulative = np.concatenate([[0.0], np.cumsum((rate[1:] + rate[:-1]) / 2 * np.diff(grid))])
    unit = synthetic(math.ceil(cumulative[-1] * 1.5) + 100, 1.0, lengths, burstiness, seed)
    keep = unit.arrivals < cumulative[-1]
    arrivals = np.interp(unit.arrivals[keep], cumulative, grid)
    segment = np.minimum(np.searchsorted(ends, arrivals, side="right"), len(segments) - 1)
    scale = np.array([seg.prompt_scale for seg in segments])[segment]
    prompts = np.maximum(1, np.round(unit.prompts[keep] * scale)).astype(np.int64)
    return Workload("bursty", arrivals, prompts, unit.outputs[keep])


@dataclass(frozen=True)
class Window:
    start: float
    serving: Pool
    """The instances that served the interval (ready ones)."""
    gpus: int
    """GPUs held during the interval (loading instances included)."""
    requests: int
    met: int
    """Requests that met both SLOs."""
    observed: replan.Observation
    reason: str


@dataclass(frozen=True)
class Replay:
    windows: tuple[Window, ...]
    interval: float

    @property
    def requests(self) -> int:
        return sum(w.requests for w in self.windows)

    @property
    def attainment(self) -> float:
        return sum(w.met for w in self.windows) / self.requests if self.requests else 1.0

    @property
    def gpu_hours(self) -> float:
        return sum(w.gpus for w in self.windows) * self.interval / 3600


def _window(workload: Workload, lo: float, hi: float) -> tuple[int, int]:
    """Indices of the first requests arriving at or after `lo` and `hi`."""
    first, last = np.searchsorted(workload.arrivals, [lo, hi], side="left")
    return int(first), int(last)


def _serve(
    pool: Pool, workload: Workload, w: int, interval: float, spec: ModelSpec, hw: GpuSpec, slo: Slo
) -> tuple[int, int, replan.Observation]:
    """(requests, met SLO, observation) of interval w on `pool`, the previous interval in front."""
    lo, mid = _window(workload, (w - 1) * interval, w * interval)
    hi = _window(workload, w * interval, (w + 1) * interval)[1]
    if hi == mid:
        return 0, 0, replan.Observation(rate=0.0, prompt_tokens_rate=0.0, output_tokens_rate=0.0)
    arrivals = workload.arrivals[lo:hi]
    sample = Workload(workload.name, arrivals - arrivals[0], workload.prompts[lo:hi], workload.outputs[lo:hi])
    result = simulate(pool, sample, spec, hw)
    own = slice(mid - lo, hi - lo)
    ttft, tpot = result.ttft[own], result.tpot[own]
    observed = replan.Observation(
        rate=(hi - mid) / interval,
        prompt_tokens_rate=float(workload.prompts[mid:hi].sum()) / interval,
        output_tokens_rate=float(workload.outputs[mid:hi].sum()) / interval,
        ttft=float(np.quantile(ttft, replan.QUANTILE)),
        tpot=float(np.quantile(tpot, replan.QUANTILE)),
    )
    return hi - mid, int(result.meets(slo)[own].sum()), observed


def _ready(decided: list[Pool]) -> Pool:
    """Per phase, the fewest instances among the decisions still loading: only those serve."""
    pool = decided[-1]
    if isinstance(pool, Colocated):
        return replace(pool, instances=min(p.instances for p in decided if isinstance(p, Colocated)))
    disaggregated = [p for p in decided if isinstance(p, Disaggregated)]
    return Disaggregated(
        pool.prefill_tp,
        min(p.prefill_instances for p in disaggregated),
        pool.decode_tp,
        min(p.decode_instances for p in disaggregated),
        pool.kv_bandwidth,
    )


def _windows(workload: Workload, interval: float) -> int:
    return max(1, math.ceil((workload.duration + 1e-9) / interval))


def replay_static(
    pool: Pool, workload: Workload, spec: ModelSpec, hw: GpuSpec, slo: Slo, interval: float
) -> Replay:
    """The trace on one fixed pool, counted per interval like `replay_replan`."""
    windows = []
    for w in range(_windows(workload, interval)):
        n, met, observed = _serve(pool, workload, w, interval, spec, hw, slo)
        windows.append(Window(w * interval, pool, pool.gpus, n, met, observed, "static"))
    return Replay(tuple(windows), interval)


def peak_rate(workload: Workload, interval: float) -> float:
    """The busiest interval's request rate: what static provisioning has to be sized for."""
    edges = np.arange(_windows(workload, interval) + 1) * interval
    counts, _ = np.histogram(workload.arrivals, bins=edges)
    return float(counts.max()) / interval


def replay_replan(
    planned: PoolPlan,
    mix: replan.PlannedMix,
    workload: Workload,
    spec: ModelSpec,
    hw: GpuSpec,
    interval: float,
    config: replan.ReplanConfig,
    startup_windows: int = 1,
    ceiling: Pool | None = None,
) -> Replay:
    """The trace with `replan.decide` after every interval.

    With a `ceiling` (the static peak pool) the replay starts from it, as a freshly planned pool
    does (the operator deploys the pool sized for the peak rate), and never holds more GPUs: on
    steady traffic re-planning then costs at most what static peak provisioning does, where
    starting from one unit and overshooting on latency misses cost more. Without one it starts
    from the planned unit, unbounded.
    """
    slo = config.slo
    if slo is None:
        raise ValueError("the replay needs the SLO in the config to count attainment")
    if ceiling is not None:
        config = replace(
            config, max_gpus=ceiling.gpus if config.max_gpus is None else min(config.max_gpus, ceiling.gpus)
        )
    decided: list[Pool] = [ceiling if ceiling is not None else planned.pool]
    state = replan.ReplanState()
    reason = "initial plan"
    windows = []
    for w in range(_windows(workload, interval)):
        serving = _ready(decided[-(startup_windows + 1) :])
        n, met, observed = _serve(serving, workload, w, interval, spec, hw, slo)
        windows.append(Window(w * interval, serving, decided[-1].gpus, n, met, observed, reason))
        decision = replan.decide(planned, decided[-1], observed, (w + 1) * interval, state, config, mix)
        decided.append(decision.pool)
        state, reason = decision.state, decision.reason
    return Replay(tuple(windows), interval)


def static_peak(planned: PoolPlan, workload: Workload, interval: float) -> Pool:
    """The planned pool sized for the busiest interval."""
    return replicas_for_rate(planned, peak_rate(workload, interval))
