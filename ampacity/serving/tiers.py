"""Keep awake, put to sleep, or stop: the three-tier idle policy of a serving pool.

A fixed or learned keep-alive only chooses *when* an idle model gives its GPU back; on the Alibaba
GenAI trace no such timing gets near 40% fewer cold starts than a fixed 10 minutes at the same idle
GPU time (docs/results/serving.md, section 6). What moves the trade-off is a cheaper idle state.
vLLM's sleep mode (`vllm serve --enable-sleep-mode`, endpoints `POST /sleep?level=1|2`,
`POST /wake_up`, `GET /is_sleeping`, served only with `VLLM_SERVER_DEV_MODE=1`) gives two:

- level 1: weights copied to host memory, KV cache dropped; the engine keeps its process, CUDA
  context, allocator and CUDA graphs, so a wake is a copy back over PCIe;
- level 2: weights and KV cache dropped (buffers kept); a wake reloads the weights from disk but
  still skips process start, allocator setup and graph capture.

vLLM's measurements (blog "Zero-Reload Model Switching with vLLM Sleep Mode", 2025-10-26, A100,
vLLM 0.11.0): level 1 wakes Qwen3-0.6B in 0.26 s and Phi-3-vision (8.3 GB) in 0.82 s, level 2 in
0.85 s and 2.58 s; level 1 of a 235B FP8 model on TP=4 takes 3-6 s; a full restart about 48 s per
switch. A straight line through the two points per level gives `wake_seconds`:
level 1 0.17 s + 0.079 s/GB per GPU (12.7 GB/s), level 2 0.56 s + 0.244 s/GB (4.1 GB/s).

A sleeping engine frees GPU memory but its pod still holds the GPU, so sleeping saves GPU time
only when several models share GPUs, at most one awake at a time (AIBrix, llm-d): an asleep
model costs 1/k of a GPU when k models sleep on it, plus the host memory its weights take at
level 1 (priced in GPU-seconds per byte-second, `host_byte_price`).

The policy. After a model's last execution it stays awake until `sleep_after`, asleep at level 1
until `deep_sleep_after`, at level 2 until `stop_after`, then stopped (any of the windows may be
empty). A request that finds the model in a tier waits that tier's resume time (0, a wake, or a
cold start). For the idle-time distribution of the model (its `IdleTimeHistogram`, the hybrid
policy's data, mixed with a prior learned on other models while it has few samples), the expected
cost of a schedule is

    E[idle GPU-seconds] + waiting_cost · E[seconds the next request waits],

and it is separable: with S(t) = P(idle > t) and G(t) = E[min(idle, t)], each threshold T_j
between tier j-1 and tier j adds (rate_{j-1} - rate_j)·G(T_j) + waiting_cost·(wait_j - wait_{j-1})·S(T_j).
So the best ordered thresholds over the histogram's bin edges come from a dynamic programme in
O(tiers · bins). `waiting_cost` (GPU-seconds one second of a user's wait is worth) is the knob
that picks a point on the trade-off; the evaluation sets it on the first part of a trace.

Everything here is pure: the reconciler and the evaluation call `decide` and `tier_at`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ampacity.serving.keepalive import MIN_SAMPLES, IdleTimeHistogram

AWAKE, ASLEEP, DEEP_ASLEEP, STOPPED = "awake", "asleep", "deep-asleep", "stopped"
TIERS = (AWAKE, ASLEEP, DEEP_ASLEEP, STOPPED)
SLEEP_LEVEL = {ASLEEP: 1, DEEP_ASLEEP: 2}

GB = 1e9
# Fitted on vLLM's published wake times (module docstring): intercept (s), seconds per byte per GPU.
WAKE_LINE = {1: (0.17, 0.079 / GB), 2: (0.56, 0.244 / GB)}
# Four 24 GB models asleep at level 1 pin 96 GB of host memory per GPU, 768 GB on an 8-GPU node.
DEFAULT_SLEEPERS_PER_GPU = 4

# Why a schedule was chosen (TierSchedule.reason).
LEARNED = "learned"
PRIOR = "prior"
NO_HISTORY = "no-history"
FIXED = "fixed"


def wake_seconds(level: int, weight_bytes_per_gpu: float) -> float:
    """vLLM's wake time from sleep `level` (1 or 2) for this many weight bytes on each GPU."""
    if level not in WAKE_LINE:
        raise ValueError(f"sleep level must be 1 or 2, not {level}")
    intercept, per_byte = WAKE_LINE[level]
    return intercept + per_byte * weight_bytes_per_gpu


@dataclass(frozen=True)
class TierCosts:
    """What each tier costs while held (GPU-seconds per second) and what a request finding the
    model there waits (seconds)."""

    cold_start_seconds: float
    """Expected full cold start (pod, engine, weights); the evaluation uses the trace's median load."""
    weight_bytes_per_gpu: float = 24 * GB
    sleepers_per_gpu: int = DEFAULT_SLEEPERS_PER_GPU
    host_byte_price: float = 0.0
    """GPU-seconds per byte-second of host memory a level-1 sleeper pins (0: memory is free)."""
    sleep_levels: tuple[int, ...] = (1, 2)
    """The sleep levels the engine supports; () for an engine without sleep mode (stop/start only)."""
    max_wake_seconds: float = math.inf
    """A sleep level whose wake takes longer is not used (the added-TTFT bound of woken requests)."""

    def __post_init__(self) -> None:
        if self.sleepers_per_gpu < 1:
            raise ValueError("sleepers_per_gpu must be at least 1")
        if self.cold_start_seconds < 0 or self.weight_bytes_per_gpu < 0 or self.host_byte_price < 0:
            raise ValueError("costs must not be negative")
        if not set(self.sleep_levels) <= {1, 2}:
            raise ValueError(f"sleep levels are 1 and 2, not {self.sleep_levels}")

    def rate(self, tier: str) -> float:
        """GPU-seconds per second a model in `tier` costs."""
        if tier == AWAKE:
            return 1.0
        if tier == ASLEEP:
            return 1.0 / self.sleepers_per_gpu + self.host_byte_price * self.weight_bytes_per_gpu
        if tier == DEEP_ASLEEP:
            return 1.0 / self.sleepers_per_gpu
        if tier == STOPPED:
            return 0.0
        raise ValueError(f"unknown tier {tier!r}")

    def resume_seconds(self, tier: str) -> float:
        """Seconds a request waits when it finds the model in `tier`."""
        if tier == AWAKE:
            return 0.0
        if tier in SLEEP_LEVEL:
            return wake_seconds(SLEEP_LEVEL[tier], self.weight_bytes_per_gpu)
        if tier == STOPPED:
            return self.cold_start_seconds
        raise ValueError(f"unknown tier {tier!r}")

    def available(self) -> tuple[str, ...]:
        """The tiers this engine can be in, awake first and stopped last."""
        return tuple(
            t
            for t in TIERS
            if t not in SLEEP_LEVEL
            or (SLEEP_LEVEL[t] in self.sleep_levels and self.resume_seconds(t) <= self.max_wake_seconds)
        )


@dataclass(frozen=True)
class TierSchedule:
    """Idle seconds (since the last execution ended) at which a model moves down a tier.

    `sleep_after <= deep_sleep_after <= stop_after`; equal values skip a tier, `math.inf` never
    reaches it.
    """

    sleep_after: float
    deep_sleep_after: float
    stop_after: float
    reason: str = FIXED

    def __post_init__(self) -> None:
        if not 0 <= self.sleep_after <= self.deep_sleep_after <= self.stop_after:
            raise ValueError("need 0 <= sleep_after <= deep_sleep_after <= stop_after")

    def boundaries(self) -> tuple[float, float, float]:
        return (self.sleep_after, self.deep_sleep_after, self.stop_after)


def keep_alive(seconds: float) -> TierSchedule:
    """The two-tier baseline: awake for `seconds`, then stopped (a fixed keep-alive)."""
    return TierSchedule(seconds, seconds, seconds, FIXED)


def tier_at(schedule: TierSchedule, idle_seconds: float) -> str:
    """The tier a model idle for `idle_seconds` is in under `schedule`."""
    for tier, boundary in zip(TIERS, schedule.boundaries(), strict=False):
        if idle_seconds < boundary:
            return tier
    return STOPPED


def next_change(schedule: TierSchedule, idle_seconds: float) -> float | None:
    """Seconds until `tier_at` changes its answer; None: stopped for good (the requeue delay)."""
    for boundary in schedule.boundaries():
        if math.isfinite(boundary) and boundary > idle_seconds:
            return boundary - idle_seconds
    return None


def held_seconds(schedule: TierSchedule, idle_seconds: float) -> dict[str, float]:
    """Seconds spent in each tier over an idle period of `idle_seconds`."""
    edges = (0.0, *schedule.boundaries(), math.inf)
    return {tier: max(0.0, min(idle_seconds, edges[i + 1]) - edges[i]) for i, tier in enumerate(TIERS)}


@dataclass(frozen=True)
class TierPolicy:
    waiting_cost: float
    """GPU-seconds one second of a user's wait is worth: high keeps models awake, low stops them."""
    prior_weight: float = MIN_SAMPLES
    """Pseudo-samples of the prior histogram mixed into a model's own (fades as it learns)."""


def _survival(counts: np.ndarray, out_of_bounds: float, bin_seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """S and G at the bin edges 0, w, ..., B·w of a histogram (idle times at their bin's middle)."""
    total = counts.sum() + out_of_bounds
    edges = np.arange(len(counts) + 1) * bin_seconds
    # At least the idle times from bin i on (and the out-of-bounds ones) outlast edge i.
    beyond = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]]) + out_of_bounds
    survival = beyond / total
    middles = (np.arange(len(counts)) + 0.5) * bin_seconds
    below = np.concatenate([[0.0], np.cumsum(counts * middles)]) / total
    return survival, below + survival * edges


def decide(
    histogram: IdleTimeHistogram,
    costs: TierCosts,
    policy: TierPolicy,
    prior: IdleTimeHistogram | None = None,
) -> TierSchedule:
    """The schedule with the lowest expected idle GPU time plus priced waiting for this model.

    The model's histogram is mixed with `prior` (same bins) at `policy.prior_weight` pseudo-samples,
    so a new model starts from what other models taught; with neither, the model stays awake for
    one cold start's worth of the waiting cost (a ski-rental keep-alive) and is then stopped.
    """
    counts = np.array(histogram.counts or [0] * histogram.bins, dtype=np.float64)
    oob = float(histogram.out_of_bounds)
    reason = LEARNED if histogram.total >= policy.prior_weight else PRIOR
    if prior is not None and prior.total:
        if (prior.bin_seconds, prior.range_seconds) != (histogram.bin_seconds, histogram.range_seconds):
            raise ValueError("the prior histogram must have the model's bins")
        weight = policy.prior_weight / prior.total
        counts = counts + weight * np.array(prior.counts or [0] * prior.bins, dtype=np.float64)
        oob += weight * prior.out_of_bounds
    elif not histogram.total:
        rent = policy.waiting_cost * costs.cold_start_seconds
        return TierSchedule(rent, rent, rent, NO_HISTORY)
    survival, below = _survival(counts, oob, histogram.bin_seconds)
    tiers = costs.available()
    edges = np.arange(len(survival)) * histogram.bin_seconds
    # best[i]: lowest cost of the thresholds so far with the latest one at edge i or before.
    best = np.zeros(len(survival))
    choice: list[np.ndarray] = []
    for upper, lower in itertools.pairwise(tiers):
        step = (costs.rate(upper) - costs.rate(lower)) * below + policy.waiting_cost * (
            costs.resume_seconds(lower) - costs.resume_seconds(upper)
        ) * survival
        cost = best + step
        # Running minimum: the next threshold may sit at this one's edge or after it.
        best = np.minimum.accumulate(cost)
        at = np.maximum.accumulate(np.where(cost <= best, np.arange(len(cost)), 0))
        choice.append(at)
    # Walk back from the cheapest last threshold.
    index = int(np.argmin(best))
    thresholds = []
    for at in reversed(choice):
        index = int(at[index])
        thresholds.append(float(edges[index]))
    thresholds.reverse()
    by_tier = dict(zip(tiers[1:], thresholds, strict=True))
    # The last edge is the histogram's range: a model stopped there is stopped for good.
    stop = by_tier[STOPPED]
    sleep = by_tier.get(ASLEEP, by_tier.get(DEEP_ASLEEP, stop))
    deep = by_tier.get(DEEP_ASLEEP, stop)
    return TierSchedule(sleep, max(sleep, deep), stop, reason)
