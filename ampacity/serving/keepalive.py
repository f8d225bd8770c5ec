"""Keep-alive and pre-warm windows per pool: the hybrid-histogram policy.

Shahrad et al., "Serverless in the Wild: Characterizing and Optimizing the Serverless Workload at a
Large Cloud Provider" (USENIX ATC 2020), replace the fixed keep-alive of FaaS platforms (10 min on
AWS Lambda, 20 min on Azure Functions) with windows learned per application from its idle times
(IT: from the end of one execution to the next arrival). A pool of GPUs serving one model is such
an application, with a cold start of tens of seconds (loading the weights) instead of a container
start, so the same policy applies with the GPU as the resource kept warm.

The paper's parameters, the defaults of `KeepAlivePolicy`:

- histogram: 1-minute bins over a 4-hour range; idle times beyond it are counted as out of bounds;
- pre-warm at the 5th percentile (the histogram's *head*), minus a 10% margin: after an execution
  the pool scales to zero and is loaded again just before the next request is likely to come;
- keep alive until the 99th percentile (the *tail*), plus a 10% margin, then scale to zero;
- the histogram is trusted only when it is *representative*: the coefficient of variation (CV) of
  its bin counts is at least 2. A flat histogram (CV near 0) says idle times are spread over the
  whole range, so neither percentile predicts anything;
- not representative: the paper falls back to a standard keep-alive with no pre-warm and a window
  as long as the range (4 h). On GPUs a 4-hour window per rarely used model is costly, so the
  fallback window is a parameter (`fallback_keepalive`);
- mostly out-of-bounds idle times (here: at least half): a time-series forecast of the next idle
  time (the paper uses ARIMA) sets the pre-warm to 85% of the forecast and keeps the pool warm
  for 30% of it (a 15% margin on each side). `forecast_idle` is an "ARIMA-lite": an AR(1) model
  of the log idle times, fitted by least squares, which needs no statistics package.

We add one condition the paper leaves implicit: a histogram of fewer than `min_samples` idle times
is not representative either (its first few samples would otherwise pass the CV test trivially).
And one option, `KeepAlivePolicy.cold_start_cost`: instead of the tail percentile, end the window
where expected cold starts plus idle GPU time (priced per cold start) are lowest for this pool's
histogram (`cost_aware_end`). How both compare with a fixed keep-alive at equal idle GPU time on
the Alibaba GenAI trace: docs/results/serving.md, section 6 (`ampacity serving keepalive-eval`).

Everything here is pure: the reconciler keeps the histogram in the pool's status, records each
idle time with `IdleTimeHistogram.record`, and asks `decide` for the windows; `scale_to_zero` and
`requeue_after` turn the windows into a replica count and the next time to look again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

BIN_SECONDS = 60.0
RANGE_SECONDS = 4 * 3600.0
HEAD_PERCENTILE = 5.0
TAIL_PERCENTILE = 99.0
HISTOGRAM_MARGIN = 0.10
FORECAST_MARGIN = 0.15
CV_THRESHOLD = 2.0
OUT_OF_BOUNDS_THRESHOLD = 0.5
MIN_SAMPLES = 10
# Idle times the forecast looks back on: enough for a stable AR(1) fit, short enough to follow drift.
FORECAST_HISTORY = 32

# Why a decision was taken (KeepAliveDecision.reason).
HISTOGRAM = "histogram"
TOO_FEW_SAMPLES = "too-few-samples"
LOW_CV = "low-cv"
OUT_OF_BOUNDS = "out-of-bounds"
FIXED = "fixed"
COST_AWARE = "cost-aware"


@dataclass(frozen=True)
class IdleTimeHistogram:
    """Idle times of one pool: counts per bin, out-of-bounds count, and the latest idle times.

    Immutable: `record` returns a new histogram, so a decision can always be traced back to the
    histogram it was taken on.
    """

    bin_seconds: float = BIN_SECONDS
    range_seconds: float = RANGE_SECONDS
    counts: tuple[int, ...] = ()
    """Idle times per bin: bin i holds [i·bin_seconds, (i+1)·bin_seconds). Empty means all zero."""
    out_of_bounds: int = 0
    """Idle times of `range_seconds` or more."""
    recent: tuple[float, ...] = ()
    """The last `FORECAST_HISTORY` idle times (seconds), in order, for the time-series fallback."""

    def __post_init__(self) -> None:
        if self.bin_seconds <= 0 or self.range_seconds < self.bin_seconds:
            raise ValueError("need 0 < bin_seconds <= range_seconds")
        if self.counts and len(self.counts) != self.bins:
            raise ValueError(f"expected {self.bins} bin counts, got {len(self.counts)}")

    @property
    def bins(self) -> int:
        return math.ceil(self.range_seconds / self.bin_seconds - 1e-9)

    @property
    def in_bounds(self) -> int:
        return sum(self.counts)

    @property
    def total(self) -> int:
        return self.in_bounds + self.out_of_bounds

    @property
    def out_of_bounds_share(self) -> float:
        return self.out_of_bounds / self.total if self.total else 0.0

    def record(self, idle_seconds: float) -> IdleTimeHistogram:
        """The histogram with one more idle time (negative idle times, overlaps, count as 0)."""
        idle = max(0.0, idle_seconds)
        recent = (*self.recent, idle)[-FORECAST_HISTORY:]
        if idle >= self.range_seconds:
            return replace(self, out_of_bounds=self.out_of_bounds + 1, recent=recent)
        counts = list(self.counts) if self.counts else [0] * self.bins
        counts[int(idle // self.bin_seconds)] += 1
        return replace(self, counts=tuple(counts), recent=recent)

    def cv(self) -> float:
        """Coefficient of variation of the bin counts (the paper's representativeness test).

        Over all bins of the range, empty ones included: ITs concentrated in a few bins give a high
        CV (a predictable pool), ITs spread evenly give a CV near 0.
        """
        n = self.in_bounds
        if n == 0 or self.bins < 2:
            return 0.0
        counts = np.array(self.counts, dtype=np.float64)
        return float(np.std(counts, ddof=1) / (n / self.bins))

    def percentile_bin(self, percentile: float) -> int:
        """The first bin at which the in-bounds cumulative share reaches `percentile` (0-100)."""
        if not self.in_bounds:
            raise ValueError("empty histogram")
        # Counts are whole, so reaching a share means reaching its ceiling; at least one sample.
        need = max(1, math.ceil(percentile / 100 * self.in_bounds - 1e-9))
        return int(np.searchsorted(np.cumsum(self.counts), need))


@dataclass(frozen=True)
class KeepAlivePolicy:
    """The hybrid policy's parameters; the defaults are the paper's (see the module docstring)."""

    head_percentile: float = HEAD_PERCENTILE
    tail_percentile: float = TAIL_PERCENTILE
    margin: float = HISTOGRAM_MARGIN
    cv_threshold: float = CV_THRESHOLD
    out_of_bounds_threshold: float = OUT_OF_BOUNDS_THRESHOLD
    forecast_margin: float = FORECAST_MARGIN
    min_samples: int = MIN_SAMPLES
    fallback_keepalive: float = RANGE_SECONDS
    """Keep-alive (s, no pre-warm) when the histogram is not representative; the paper: the range."""
    cold_start_cost: float | None = None
    """Idle GPU-seconds one cold start is worth. None: the paper's tail percentile ends the
    keep-alive. Set: the keep-alive ends where the expected cold starts plus idle time (in these
    units) are lowest, see `cost_aware_end` (our extension)."""


@dataclass(frozen=True)
class KeepAliveDecision:
    """Windows measured from the end of the pool's last execution.

    The pool holds no replica for `prewarm_seconds`, then holds one (ready) for `keepalive_seconds`,
    then scales to zero. With `prewarm_seconds == 0` it simply stays warm for the keep-alive.
    """

    prewarm_seconds: float
    keepalive_seconds: float
    reason: str

    @property
    def warm_until(self) -> float:
        return self.prewarm_seconds + self.keepalive_seconds


def fixed(keepalive_seconds: float) -> KeepAliveDecision:
    """The baseline: a fixed keep-alive after every execution, never a pre-warm."""
    return KeepAliveDecision(0.0, keepalive_seconds, FIXED)


def forecast_idle(recent: tuple[float, ...]) -> float:
    """Next idle time (s) from the previous ones: AR(1) on log(1 + IT), least squares.

    Idle times are heavy-tailed, so the model works on their logarithm; with fewer than three
    samples, or a degenerate fit, the forecast is the mean of the logs (a geometric mean).
    """
    if not recent:
        raise ValueError("no idle times to forecast from")
    logs = [math.log1p(x) for x in recent]
    mean = sum(logs) / len(logs)
    if len(logs) < 3:
        return math.expm1(mean)
    xs, ys = logs[:-1], logs[1:]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return math.expm1(mean)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    # A stationary AR(1) only: a fitted |slope| >= 1 would extrapolate a trend without bound.
    slope = max(-0.99, min(0.99, slope))
    return math.expm1(my + slope * (logs[-1] - mx))


def cost_aware_end(histogram: IdleTimeHistogram, prewarm: float, cold_start_cost: float) -> float:
    """The bin edge (s) to keep a pool warm until that minimises, per idle period,
    P(cold start) + E[idle GPU seconds] / `cold_start_cost`, given the pre-warm.

    The percentile rule spends idle time on every pool alike; this spends it where it saves the
    most cold starts per idle second, the trade-off a fixed budget of idle GPU time asks for
    (keeping warm to the next bin edge is worth it while the chance of a request in that bin beats
    the idle time it costs, summed over the idle periods that reach it). Idle times are taken at
    their bin's middle; out-of-bounds ones idle for the whole window and start cold.
    """
    if not histogram.total:
        raise ValueError("empty histogram")
    total = histogram.total
    counts = np.array(histogram.counts if histogram.counts else [0] * histogram.bins, dtype=np.float64)
    ends = np.arange(1, len(counts) + 1) * histogram.bin_seconds
    middles = ends - histogram.bin_seconds / 2
    early = middles < prewarm
    cold_before = np.cumsum(np.where(early, counts, 0.0))
    covered = np.cumsum(np.where(early, 0.0, counts))
    idle_covered = np.cumsum(np.where(early, 0.0, counts * (middles - prewarm)))
    # Periods that outlast the window idle for all of it.
    idle = idle_covered + (total - cold_before - covered) * (ends - prewarm)
    cost = np.where(ends > prewarm, (total - covered) / total + idle / total / cold_start_cost, np.inf)
    best = int(np.argmin(cost))
    # Against not keeping warm at all: every period cold, nothing idle (a cost of 1).
    return float(ends[best]) if cost[best] < 1.0 else prewarm


def decide(histogram: IdleTimeHistogram, policy: KeepAlivePolicy | None = None) -> KeepAliveDecision:
    """Pre-warm and keep-alive windows for a pool with these idle times (the hybrid policy)."""
    p = policy if policy is not None else KeepAlivePolicy()
    if histogram.total < p.min_samples:
        return KeepAliveDecision(0.0, p.fallback_keepalive, TOO_FEW_SAMPLES)
    if histogram.out_of_bounds_share >= p.out_of_bounds_threshold:
        predicted = forecast_idle(histogram.recent)
        return KeepAliveDecision(
            predicted * (1 - p.forecast_margin), predicted * 2 * p.forecast_margin, OUT_OF_BOUNDS
        )
    if histogram.cv() < p.cv_threshold:
        return KeepAliveDecision(0.0, p.fallback_keepalive, LOW_CV)
    width = histogram.bin_seconds
    # The head's bin start (an IT there may come at its very start) and the tail's bin end.
    prewarm = histogram.percentile_bin(p.head_percentile) * width * (1 - p.margin)
    if p.cold_start_cost is not None:
        warm_until = max(prewarm, cost_aware_end(histogram, prewarm, p.cold_start_cost))
        return KeepAliveDecision(prewarm, warm_until - prewarm, COST_AWARE)
    warm_until = (histogram.percentile_bin(p.tail_percentile) + 1) * width * (1 + p.margin)
    return KeepAliveDecision(prewarm, warm_until - prewarm, HISTOGRAM)


def prewarm_start(decision: KeepAliveDecision, startup_seconds: float = 0.0) -> float:
    """When (idle seconds) a replica must start so it is ready as the pre-warm window opens.

    A replica takes `startup_seconds` (see `placement.startup_seconds`) to load its weights, so it
    is started that much early; from then on it holds a GPU. 0 when there is no pre-warm, or when
    the window opens sooner than a replica could load: the replica that served the last request
    then simply stays.
    """
    return max(0.0, decision.prewarm_seconds - startup_seconds)


def scale_to_zero(decision: KeepAliveDecision, idle_seconds: float, startup_seconds: float = 0.0) -> bool:
    """Whether a pool idle for `idle_seconds` since its last execution should hold no replica.

    True before the pre-warm (less the startup time) and once the keep-alive is over; a pool with
    queued or running requests is not idle, and the caller keeps its replicas whatever this says.
    """
    return idle_seconds < prewarm_start(decision, startup_seconds) or idle_seconds >= decision.warm_until


def requeue_after(
    decision: KeepAliveDecision, idle_seconds: float, startup_seconds: float = 0.0
) -> float | None:
    """Seconds until `scale_to_zero` next changes its answer; None: the pool stays at zero.

    The reconciler requeues an idle pool this long after its last look instead of polling.
    """
    for moment in (prewarm_start(decision, startup_seconds), decision.warm_until):
        if moment > idle_seconds:
            return moment - idle_seconds
    return None
