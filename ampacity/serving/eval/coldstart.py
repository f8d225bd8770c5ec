"""Cold starts of serverless GPU pools, replayed on the Alibaba GenAI trace.

The trace (alibaba/clusterdata cluster-trace-v2026-GenAI; Lin et al., SoCC 2025) holds 13,217
diffusion-serving requests over two weeks, each naming its base model, and, separately, 7,531
measured base-model loads (the main part of a cold start, p50 22.7 s). A base model is the unit
that is kept warm or scaled to zero, like an application in Shahrad et al. (ATC 2020).

The replay follows the paper's simulation: one instance per model, and requests that arrive while
it runs are warm (the instance serves them concurrently); only the gaps between executions are
idle times. What we add for GPUs is time: every cold start waits a model load drawn from the
measured loads (the same draw for the same request under every policy), and a pre-warm starts the
load early by the expected startup time, holding the GPU while it loads. Idle GPU time is the
time an instance holds a GPU with no request running or waiting on it, pre-warm loads included;
the load that a cold start waits for is counted as cold-start seconds instead.
"""

from __future__ import annotations

import csv
import io
import math
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ampacity.data import trace_path
from ampacity.serving import keepalive, placement, tiers
from ampacity.serving.keepalive import IdleTimeHistogram, KeepAliveDecision, KeepAlivePolicy

PREWARMED = "with a pre-warm"

_REQUESTS = ("alibaba-genai", "lora_request_trace_until_2024-11-28.csv")
_LOADS = ("alibaba-genai", "basemodel_update_latency_anon.tar.gz")


@dataclass(frozen=True)
class ModelRequests:
    """One base model's requests in arrival order: arrival (s), execution (s), and the load (s)
    the request waits if it finds no warm instance."""

    model: str
    arrivals: np.ndarray
    executions: np.ndarray
    loads: np.ndarray


@dataclass(frozen=True)
class ColdStartTrace:
    models: tuple[ModelRequests, ...]
    load_samples: np.ndarray
    """All measured model loads (s)."""

    @property
    def requests(self) -> int:
        return sum(len(m.arrivals) for m in self.models)

    @property
    def expected_startup(self) -> float:
        """The median load: how early a pre-warm starts loading."""
        return float(np.median(self.load_samples))


def load_model_loads() -> np.ndarray:
    """Measured base-model load latencies (s) from the trace's tarball, read in memory."""
    with tarfile.open(trace_path(*_LOADS)) as archive:
        member = next(m for m in archive.getmembers() if m.isfile() and m.name.endswith(".csv"))
        stream = archive.extractfile(member)
        if stream is None:
            raise ValueError(f"{member.name} in {_LOADS[1]} is not a regular file")
        with stream:
            rows = csv.DictReader(io.TextIOWrapper(stream, encoding="utf-8"))
            return np.array([float(r["value"]) / 1e3 for r in rows])


def load_alibaba_genai(seed: int = 0) -> ColdStartTrace:
    """Requests per base model, each given a load latency drawn (seeded) from the measured loads.

    The two files cannot be joined (loads are keyed by container, requests by model), so each
    request's cold-start time is an independent draw from the measured distribution.
    """
    with trace_path(*_REQUESTS).open(newline="") as f:
        rows = list(csv.DictReader(f))
    samples = load_model_loads()
    draws = np.random.default_rng(seed).choice(samples, size=len(rows))
    grouped: dict[str, list[tuple[np.datetime64, float, float]]] = defaultdict(list)
    for row, load in zip(rows, draws, strict=True):
        stamp = np.datetime64(row["gmt_create"].replace(" ", "T"), "s")
        # A few rows (still pending) have no execution time: they occupied the instance only briefly.
        execution = float(row["exec_time_seconds"] or 0.0)
        grouped[row["checkpoint_model_version_id"]].append((stamp, execution, float(load)))
    start = min(stamp for requests in grouped.values() for stamp, _, _ in requests)
    models = []
    for name in sorted(grouped):
        requests = sorted(grouped[name], key=lambda r: r[0])
        models.append(
            ModelRequests(
                name,
                np.array([(s - start) / np.timedelta64(1, "s") for s, _, _ in requests]),
                np.array([e for _, e, _ in requests]),
                np.array([load for _, _, load in requests]),
            )
        )
    return ColdStartTrace(tuple(models), samples)


@dataclass(frozen=True)
class ColdStartResult:
    requests: int
    cold_starts: int
    """Requests that waited for a model load, first requests included (partly loaded pre-warms too)."""
    cold_start_seconds: float
    idle_gpu_seconds: float
    decisions: dict[str, int]
    """How many idle periods each kind of decision governed; under `PREWARMED`, how many of them
    scaled to zero and pre-warmed."""

    @property
    def cold_fraction(self) -> float:
        return self.cold_starts / self.requests if self.requests else 0.0


def _gap(decision: KeepAliveDecision, idle: float, load: float, startup: float) -> tuple[float, float]:
    """(seconds the arriving request waits for a load, idle GPU seconds) over one idle period."""
    start = keepalive.prewarm_start(decision, startup)
    end = decision.warm_until
    if idle < start or start >= end:
        # Scaled to zero when it arrived, or a window too short to load into.
        return load, 0.0
    ready = start + load if start > 0 else 0.0
    if idle >= end:
        return load, end - start
    return max(0.0, ready - idle), idle - start


def replay_model(
    requests: ModelRequests, policy: KeepAlivePolicy | float, startup: float
) -> tuple[int, float, float, Counter[str]]:
    """(cold starts, cold-start seconds, idle GPU seconds, decisions) of one model.

    `policy` is the hybrid policy's parameters, or a fixed keep-alive in seconds.
    """
    histogram = IdleTimeHistogram()
    reasons: Counter[str] = Counter()
    colds, waited, idle_total = 1, float(requests.loads[0]), 0.0
    busy_until = float(requests.arrivals[0] + requests.loads[0] + requests.executions[0])
    arrivals, executions, loads = (
        a[1:].tolist() for a in (requests.arrivals, requests.executions, requests.loads)
    )
    for t, execution, load in zip(arrivals, executions, loads, strict=True):
        if t <= busy_until:
            busy_until = max(busy_until, t + execution)
            continue
        if isinstance(policy, KeepAlivePolicy):
            decision = keepalive.decide(histogram, policy)
        else:
            decision = keepalive.fixed(policy)
        reasons[decision.reason] += 1
        if decision.prewarm_seconds > 0:
            reasons[PREWARMED] += 1
        idle = t - busy_until
        wait, held = _gap(decision, idle, load, startup)
        histogram = histogram.record(idle)
        if wait > 0:
            colds += 1
            waited += wait
        idle_total += held
        busy_until = t + wait + execution
    return colds, waited, idle_total, reasons


def replay(trace: ColdStartTrace, policy: KeepAlivePolicy | float) -> ColdStartResult:
    """Every model of the trace under one policy (a hybrid policy or a fixed keep-alive in s)."""
    colds, waited, idle = 0, 0.0, 0.0
    reasons: Counter[str] = Counter()
    for requests in trace.models:
        c, w, i, r = replay_model(requests, policy, trace.expected_startup)
        colds, waited, idle = colds + c, waited + w, idle + i
        reasons += r
    return ColdStartResult(trace.requests, colds, waited, idle, dict(reasons))


def fixed_at_idle(trace: ColdStartTrace, idle_gpu_seconds: float) -> float:
    """The longest fixed keep-alive (s, up to a day) that spends no more idle GPU time than
    `idle_gpu_seconds`: the fair fixed baseline for a policy at equal idle GPU time."""
    return tune_to_idle(trace, idle_gpu_seconds, float, 0.0, 24 * 3600.0, iterations=30)


def tune_to_idle(
    trace: ColdStartTrace,
    idle_gpu_seconds: float,
    build: Callable[[float], KeepAlivePolicy | float],
    low: float,
    high: float,
    iterations: int = 12,
) -> float:
    """The largest parameter x in [low, high] at which `build(x)` spends no more idle GPU time
    than `idle_gpu_seconds`, by bisection (idle time must grow with x).

    A policy's parameters (a fixed keep-alive, the tail percentile, the cost of a cold start) pick
    a point on its trade-off between cold starts and idle time; this picks the point that compares
    with another policy at equal idle GPU time.
    """

    def fits(x: float) -> bool:
        return replay(trace, build(x)).idle_gpu_seconds <= idle_gpu_seconds

    if not fits(low):
        raise ValueError("the policy spends more idle time than that at its lowest setting")
    if fits(high):
        return high
    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def idle_times(requests: ModelRequests) -> np.ndarray:
    """Gaps (s) between one execution's end and the next arrival, with no cold-start waits."""
    gaps = []
    busy_until = float(requests.arrivals[0] + requests.executions[0])
    for t, execution in zip(requests.arrivals[1:].tolist(), requests.executions[1:].tolist(), strict=True):
        if t > busy_until:
            gaps.append(t - busy_until)
            busy_until = t + execution
        else:
            busy_until = max(busy_until, t + execution)
    return np.array(gaps)


def hindsight_bound(trace: ColdStartTrace, idle_gpu_seconds: float) -> tuple[int, float]:
    """(cold starts, idle GPU s) of the best per-model fixed keep-alives chosen with hindsight.

    Each model gets the single keep-alive that, knowing all its future idle times, minimises cold
    starts + λ·idle; λ is bisected until the idle time fits the budget. No per-model window policy
    learned online (the hybrid policy included) can do better at that idle time, so this bounds
    what the histogram can buy on a trace. Cold-start waits are left out of the gaps.
    """
    options = []
    for requests in trace.models:
        gaps = np.sort(idle_times(requests))
        n = len(gaps)
        # Keep-alive = the j-th shortest gap covers gaps 0..j; k = 0 covers none.
        colds = np.concatenate([[n], n - 1 - np.arange(n)])
        idle = np.concatenate([[0.0], np.cumsum(gaps) + gaps * (n - 1 - np.arange(n))])
        options.append((colds + 1, idle))  # + the model's first request

    def pick(lam: float) -> tuple[int, float]:
        chosen = [int(np.argmin(c + lam * i)) for c, i in options]
        return (
            sum(int(c[j]) for (c, _), j in zip(options, chosen, strict=True)),
            sum(float(i[j]) for (_, i), j in zip(options, chosen, strict=True)),
        )

    low, high = 1e-9, 1.0  # λ per idle second: high spends nothing, low covers every gap
    for _ in range(60):
        mid = math.sqrt(low * high)
        if pick(mid)[1] <= idle_gpu_seconds:
            high = mid
        else:
            low = mid
    return pick(high)


# --- The three tiers (awake, asleep, stopped): `tiers.py`, replayed on a train/test split. ---

TIER_BIN_SECONDS = 10.0
"""The tier policy's histogram bins: the wake-or-stay choice plays out within the first minutes,
finer than the hybrid policy's 1-minute bins."""

Decider = Callable[[IdleTimeHistogram], tiers.TierSchedule]
# What the replay asks at the start of each idle period: (history, the period's length, the load a
# cold start would wait) -> schedule. Online policies look at the history only; the bound looks ahead.
_PeriodChoice = Callable[[IdleTimeHistogram, float, float], tiers.TierSchedule]


@dataclass(frozen=True)
class TierResult:
    """One policy over the requests that arrived in a time window (the model state is learned from
    the start of the trace, so the window's first idle periods already have a history)."""

    requests: int
    cold_starts: int
    """Requests that found their model stopped and waited a full model load (first requests too)."""
    wakes: dict[int, int]
    """Requests that found their model asleep, per sleep level."""
    cold_waits: np.ndarray
    """Added TTFT (s) of every request that waited for a cold start: the one that started it and
    those that arrived while it loaded."""
    woken_waits: np.ndarray
    """Added TTFT (s) of every request that waited for a wake."""
    idle_gpu_seconds: float
    """GPU-seconds held with no request running or waiting: awake idle at 1, asleep at its share."""
    tier_seconds: dict[str, float]
    """Model-seconds spent idle in each tier."""
    cold_events: tuple[tuple[float, str, bool], ...] = ()
    """(time, model, inside the window) of every cold start of the trace, in and out of the window:
    what the weight-locality study places on nodes."""
    wake_events: tuple[tuple[float, str, float], ...] = ()
    """(time, model, wake seconds) of every wake in the window: what the fencing check looks at."""
    executions: tuple[tuple[float, float, str], ...] = ()
    """(start, end, model) of every execution in the window: when a model holds its GPU's one
    awake slot and cannot be put to sleep."""

    @property
    def waits(self) -> np.ndarray:
        return np.concatenate([self.cold_waits, self.woken_waits])

    @property
    def woken(self) -> int:
        return sum(self.wakes.values())


def percentile(values: np.ndarray, q: float) -> float:
    """The q-th percentile of `values`, 0 when there are none (no request waited)."""
    return float(np.percentile(values, q)) if len(values) else 0.0


def split_time(trace: ColdStartTrace, share: float = 0.5) -> float:
    """The arrival time (s) by which `share` of the trace's requests have come: train before it,
    report after it."""
    arrivals = np.sort(np.concatenate([m.arrivals for m in trace.models]))
    return float(arrivals[min(len(arrivals) - 1, int(share * len(arrivals)))])


def prior_histogram(
    trace: ColdStartTrace, until: float, bin_seconds: float = TIER_BIN_SECONDS
) -> IdleTimeHistogram:
    """Every model's idle times that ended before `until`, pooled: what a new model starts from."""
    histogram = IdleTimeHistogram(bin_seconds=bin_seconds)
    counts = [0] * histogram.bins
    out_of_bounds = 0
    for requests in trace.models:
        gaps = idle_times(requests)
        ends = _gap_ends(requests)
        for gap in gaps[ends < until].tolist():
            if gap >= histogram.range_seconds:
                out_of_bounds += 1
            else:
                counts[int(gap // bin_seconds)] += 1
    return IdleTimeHistogram(bin_seconds=bin_seconds, counts=tuple(counts), out_of_bounds=out_of_bounds)


def _gap_ends(requests: ModelRequests) -> np.ndarray:
    """The arrival that ends each gap of `idle_times` (same order)."""
    ends = []
    busy_until = float(requests.arrivals[0] + requests.executions[0])
    for t, execution in zip(requests.arrivals[1:].tolist(), requests.executions[1:].tolist(), strict=True):
        if t > busy_until:
            ends.append(t)
            busy_until = t + execution
        else:
            busy_until = max(busy_until, t + execution)
    return np.array(ends)


@dataclass
class _TierTally:
    requests: int = 0
    cold_starts: int = 0
    idle_gpu_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.wakes: Counter[int] = Counter()
        self.cold_waits: list[float] = []
        self.woken_waits: list[float] = []
        self.tier_seconds: defaultdict[str, float] = defaultdict(float)
        self.cold_events: list[tuple[float, str, bool]] = []
        self.wake_events: list[tuple[float, str, float]] = []
        self.executions: list[tuple[float, float, str]] = []

    def wait(self, tier: str, seconds: float) -> None:
        (self.cold_waits if tier == tiers.STOPPED else self.woken_waits).append(seconds)


def _replay_model_tiers(
    requests: ModelRequests,
    choose: _PeriodChoice,
    costs: tiers.TierCosts,
    window: tuple[float, float],
    bin_seconds: float,
    tally: _TierTally,
) -> None:
    """One model through the trace; what happens to requests inside `window` goes into `tally`.

    Requests that arrive while a cold start or a wake is under way wait for the rest of it;
    requests that arrive while the model runs are served at once (one instance per model, serving
    concurrently, as in the keep-alive replay above).
    """
    start, end = window
    histogram = IdleTimeHistogram(bin_seconds=bin_seconds)
    arrivals, executions, loads = (
        a.tolist() for a in (requests.arrivals, requests.executions, requests.loads)
    )
    kind, ready = tiers.STOPPED, arrivals[0] + loads[0]
    busy_until = ready + executions[0]
    tally.cold_events.append((arrivals[0], requests.model, start <= arrivals[0] < end))
    if start <= arrivals[0] < end:
        tally.requests += 1
        tally.cold_starts += 1
        tally.wait(kind, loads[0])
    for t, execution, load in zip(arrivals[1:], executions[1:], loads[1:], strict=True):
        counted = start <= t < end
        tally.requests += counted
        if t <= busy_until:
            if t < ready and counted:
                tally.wait(kind, ready - t)
            if counted:
                tally.executions.append((max(t, ready), max(t, ready) + execution, requests.model))
            busy_until = max(busy_until, max(t, ready) + execution)
            continue
        idle = t - busy_until
        schedule = choose(histogram, idle, load)
        kind = tiers.tier_at(schedule, idle)
        wait = load if kind == tiers.STOPPED else costs.resume_seconds(kind)
        if kind == tiers.STOPPED:
            tally.cold_events.append((t, requests.model, counted))
        if counted:
            for tier, seconds in tiers.held_seconds(schedule, idle).items():
                tally.tier_seconds[tier] += seconds
                tally.idle_gpu_seconds += costs.rate(tier) * seconds
            if kind == tiers.STOPPED:
                tally.cold_starts += 1
            elif kind != tiers.AWAKE:
                tally.wakes[tiers.SLEEP_LEVEL[kind]] += 1
                tally.wake_events.append((t, requests.model, wait))
            tally.executions.append((t + wait, t + wait + execution, requests.model))
            if wait > 0:
                tally.wait(kind, wait)
        histogram = histogram.record(idle)
        ready = t + wait
        busy_until = ready + execution


def replay_tiers(
    trace: ColdStartTrace,
    decider: Decider | tiers.TierSchedule,
    costs: tiers.TierCosts,
    window: tuple[float, float] = (-math.inf, math.inf),
    bin_seconds: float = TIER_BIN_SECONDS,
) -> TierResult:
    """Every model of the trace under one tier policy (a decider, or one fixed schedule for all)."""
    if isinstance(decider, tiers.TierSchedule):
        fixed_schedule = decider
        decider = lambda _histogram: fixed_schedule  # noqa: E731
    chosen = decider
    return _replay(trace, lambda histogram, _idle, _load: chosen(histogram), costs, window, bin_seconds)


def _replay(
    trace: ColdStartTrace,
    choose: _PeriodChoice,
    costs: tiers.TierCosts,
    window: tuple[float, float],
    bin_seconds: float,
) -> TierResult:
    tally = _TierTally()
    for requests in trace.models:
        _replay_model_tiers(requests, choose, costs, window, bin_seconds, tally)
    return TierResult(
        tally.requests,
        tally.cold_starts,
        dict(tally.wakes),
        np.array(tally.cold_waits),
        np.array(tally.woken_waits),
        tally.idle_gpu_seconds,
        dict(tally.tier_seconds),
        tuple(sorted(tally.cold_events)),
        tuple(tally.wake_events),
        tuple(tally.executions),
    )


def tier_decider(
    costs: tiers.TierCosts, policy: tiers.TierPolicy, prior: IdleTimeHistogram | None
) -> Decider:
    """The learned three-tier policy as a decider for `replay_tiers`."""
    return lambda histogram: tiers.decide(histogram, costs, policy, prior)


def hybrid_decider(policy: KeepAlivePolicy) -> Decider:
    """The hybrid histogram policy as a two-tier decider (awake until its window ends, then stopped).

    Its pre-warm is left out: it fired in 25 of 11,313 idle periods on this trace (section 6).
    """
    return lambda histogram: tiers.keep_alive(keepalive.decide(histogram, policy).warm_until)


def clairvoyant_tiers(
    trace: ColdStartTrace, costs: tiers.TierCosts, idle_price: float, window: tuple[float, float]
) -> TierResult:
    """The bound on cold starts: each idle period spent in the one tier that, knowing its length,
    minimises idle GPU-seconds · `idle_price` + a cold start, with no price on wakes.

    Knowing how long the model will idle, it never pays to change tier midway (a later tier costs
    less per second, so going there at once is cheaper). So at the idle time this spends, no
    policy over these tiers (learned, fixed or tuned in hindsight) makes fewer cold starts, up to
    the rounding of the Lagrangian; pre-warming, which no tier can do, is left out.
    """
    available = costs.available()

    def cheapest(idle: float, _load: float) -> str:
        def cost(tier: str) -> tuple[float, float]:
            # Ties (two tiers at the same rate) go to the shorter wake.
            return (
                idle_price * costs.rate(tier) * idle + (tier == tiers.STOPPED),
                costs.resume_seconds(tier),
            )

        return min(available, key=cost)

    holding = {
        tiers.AWAKE: tiers.TierSchedule(math.inf, math.inf, math.inf),
        tiers.ASLEEP: tiers.TierSchedule(0.0, math.inf, math.inf),
        tiers.DEEP_ASLEEP: tiers.TierSchedule(0.0, 0.0, math.inf),
        tiers.STOPPED: tiers.TierSchedule(0.0, 0.0, 0.0),
    }
    return _replay(
        trace, lambda _h, idle, load: holding[cheapest(idle, load)], costs, window, TIER_BIN_SECONDS
    )


def before(trace: ColdStartTrace, until: float) -> ColdStartTrace:
    """The trace cut to the requests that arrived before `until`: the training part."""
    models = []
    for m in trace.models:
        keep = m.arrivals < until
        if keep.any():
            models.append(ModelRequests(m.model, m.arrivals[keep], m.executions[keep], m.loads[keep]))
    return ColdStartTrace(tuple(models), trace.load_samples)


def tune_log(fits: Callable[[float], bool], low: float, high: float, iterations: int = 14) -> float:
    """The largest x in [low, high] (log scale) with `fits(x)`, for a `fits` true below some x."""
    if not fits(low):
        raise ValueError("the policy spends more idle time than the budget at its lowest setting")
    if fits(high):
        return high
    for _ in range(iterations):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


@dataclass(frozen=True)
class PolicyRun:
    """One policy of the study: its parameter (set on the training part) and its test result."""

    name: str
    parameter: float
    result: TierResult


@dataclass(frozen=True)
class TierStudy:
    split: float
    """Arrival time (s) that separates the training part from the reported part."""
    costs: tiers.TierCosts
    train_budget: float
    """Idle GPU-seconds fixed 10 min spends on the training part: every tuned policy's budget there."""
    runs: tuple[PolicyRun, ...]

    def run(self, name: str) -> PolicyRun:
        return next(r for r in self.runs if r.name == name)


FIXED_10 = "fixed keep-alive 10 min"
HYBRID = "cost-aware hybrid (2 tiers)"
FIXED_SLEEP = "sleep at once, fixed stop"
TIERED = "three-tier policy (learned)"
CLAIRVOYANT = "clairvoyant tiers (bound)"


BIN_MINUTE = 60.0


def _policies(
    costs: tiers.TierCosts, prior: IdleTimeHistogram
) -> dict[str, tuple[Callable[[float], Decider | tiers.TierSchedule], float, float, float]]:
    """Each tunable policy: (its decider for a parameter x, x's low and high, histogram bins)."""
    gpu = KeepAlivePolicy(fallback_keepalive=600.0)
    return {
        HYBRID: (lambda x: hybrid_decider(replace(gpu, cold_start_cost=x)), 1.0, 1e6, BIN_MINUTE),
        FIXED_SLEEP: (lambda x: tiers.TierSchedule(0.0, x, x), 1.0, 24 * 3600.0, TIER_BIN_SECONDS),
        TIERED: (
            lambda x: tier_decider(costs, tiers.TierPolicy(x), prior),
            1e-3,
            1e4,
            TIER_BIN_SECONDS,
        ),
    }


def _within(
    train: ColdStartTrace,
    build: Callable[[float], Decider | tiers.TierSchedule],
    costs: tiers.TierCosts,
    bins: float,
    budget: float,
) -> Callable[[float], bool]:
    """Whether the policy at parameter x spends no more than `budget` idle GPU-seconds on `train`."""
    return lambda x: replay_tiers(train, build(x), costs, bin_seconds=bins).idle_gpu_seconds <= budget


def tier_study(
    trace: ColdStartTrace,
    costs: tiers.TierCosts,
    share: float = 0.5,
    progress: Callable[[str], None] = lambda _line: None,
) -> TierStudy:
    """Every policy tuned on the first `share` of the requests to spend fixed 10 min's idle GPU time
    there, then replayed with that parameter on the rest (the part reported)."""
    split = split_time(trace, share)
    train, test = before(trace, split), (split, math.inf)
    prior = prior_histogram(trace, split)
    budget = replay_tiers(train, tiers.keep_alive(600.0), costs).idle_gpu_seconds
    runs = [PolicyRun(FIXED_10, 600.0, replay_tiers(trace, tiers.keep_alive(600.0), costs, test))]
    for name, (build, low, high, bins) in _policies(costs, prior).items():
        progress(f"tuning {name} on the training part")
        x = tune_log(
            _within(train, build, costs, bins, budget),
            low,
            high,
        )
        runs.append(PolicyRun(name, x, replay_tiers(trace, build(x), costs, test, bins)))
    progress(f"tuning {CLAIRVOYANT} on the training part")
    window = (-math.inf, math.inf)
    w = tune_log(
        lambda w: clairvoyant_tiers(train, costs, 1 / w, window).idle_gpu_seconds <= budget, 1.0, 1e7
    )
    runs.append(PolicyRun(CLAIRVOYANT, w, clairvoyant_tiers(trace, costs, 1 / w, test)))
    return TierStudy(split, costs, budget, tuple(runs))


def frontier(
    trace: ColdStartTrace,
    costs: tiers.TierCosts,
    split: float,
    points: int = 7,
    progress: Callable[[str], None] = lambda _line: None,
) -> dict[str, list[tuple[float, int]]]:
    """(idle GPU-seconds, cold starts) on the reported part for each policy over its parameter's
    range: the trade-off curves of the frontier plot."""
    prior = prior_histogram(trace, split)
    test = (split, math.inf)
    curves: dict[str, list[tuple[float, int]]] = {}
    keepalives = np.geomspace(60.0, 4 * 3600.0, points)
    curves["fixed keep-alive"] = [
        _point(replay_tiers(trace, tiers.keep_alive(float(x)), costs, test)) for x in keepalives
    ]
    ranges = {HYBRID: (30.0, 3e4), FIXED_SLEEP: (300.0, 24 * 3600.0), TIERED: (3.0, 1000.0)}
    for name, (build, _low, _high, bins) in _policies(costs, prior).items():
        progress(f"frontier of {name}")
        low, high = ranges[name]
        curves[name] = [
            _point(replay_tiers(trace, build(float(x)), costs, test, bins))
            for x in np.geomspace(low, high, points)
        ]
    progress(f"frontier of {CLAIRVOYANT}")
    curves[CLAIRVOYANT] = [
        _point(clairvoyant_tiers(trace, costs, 1 / float(w), test)) for w in np.geomspace(30.0, 3e5, points)
    ]
    return curves


def _point(result: TierResult) -> tuple[float, int]:
    return (result.idle_gpu_seconds, result.cold_starts)


def fixed_keepalive_at(
    trace: ColdStartTrace, costs: tiers.TierCosts, idle_gpu_seconds: float, window: tuple[float, float]
) -> PolicyRun:
    """The fixed keep-alive that spends `idle_gpu_seconds` in `window`: the fair baseline for a
    policy that spent that much there (the baseline is given its best point, the policy is not)."""
    x = tune_log(
        lambda x: (
            replay_tiers(trace, tiers.keep_alive(x), costs, window).idle_gpu_seconds <= idle_gpu_seconds
        ),
        1.0,
        24 * 3600.0,
        iterations=20,
    )
    return PolicyRun(
        f"fixed keep-alive at that idle time ({x / 60:.0f} min)",
        x,
        replay_tiers(trace, tiers.keep_alive(x), costs, window),
    )


# --- Weight locality: how much of the cold-start time placing a load where the weights sit saves. ---

FAST_LOAD_SECONDS = 10.0
"""The trough of the measured loads: a mode at 2-3 s (weights on the node) and most at 20-50 s
(weights fetched); loads under it are taken as node-local."""


@dataclass(frozen=True)
class LocalityResult:
    cold_starts: int
    local_with: int
    """Cold starts placed on a node holding the weights when placement prefers such nodes."""
    local_without: int
    """... when the scheduler picks any node with a free GPU (here: one at random)."""
    seconds_with: float
    seconds_without: float

    @property
    def saved(self) -> float:
        return 1 - self.seconds_with / self.seconds_without if self.seconds_without else 0.0


def locality_study(
    trace: ColdStartTrace,
    cold_events: tuple[tuple[float, str, bool], ...],
    nodes: int = 8,
    cached_models_per_node: int = 40,
    weight_bytes: float = 24 * tiers.GB,
    seed: int = 0,
) -> LocalityResult:
    """Cold starts placed with `placement.rank` (ServerlessLLM's estimate on the nodes' cache
    labels) against placement blind to the cache, on `nodes` nodes whose local SSD keeps the
    weights of the last `cached_models_per_node` models it loaded (LRU).

    A cold start's load is drawn from the measured loads: from their fast mode when the chosen node
    holds the weights, from the slow mode otherwise (same seeded draws for both placements). The
    whole trace warms the caches; only the cold starts inside the window are counted. GPUs are
    taken as free on every node: at most a few models of this trace run at once.
    """
    rng = np.random.default_rng(seed)
    fast = trace.load_samples[trace.load_samples < FAST_LOAD_SECONDS]
    slow = trace.load_samples[trace.load_samples >= FAST_LOAD_SECONDS]
    names = [f"node-{i}" for i in range(nodes)]
    totals = {}
    for aware in (True, False):
        caches: list[dict[str, None]] = [{} for _ in names]  # insertion order = LRU order
        draws = np.random.default_rng(seed)
        local = count = 0
        seconds = 0.0
        for _t, model, counted in cold_events:
            # The trace has a model with an empty name: a prefix keeps every label valid.
            name = f"basemodel-{model}"
            label = placement.model_label(name).removeprefix(placement.MODEL_LABEL_PREFIX)
            if aware:
                candidates = [
                    placement.NodeCache(name, 8, {label: placement.SSD} if label in cache else {})
                    for name, cache in zip(names, caches, strict=True)
                ]
                best = placement.rank(candidates, name, weight_bytes, 1)[0]
                # No node holds the weights: every node is as good, the scheduler picks one.
                index = names.index(best.node) if best.tier != placement.REMOTE else int(rng.integers(nodes))
            else:
                index = int(rng.integers(nodes))
            hit = label in caches[index]
            fast_draw, slow_draw = float(draws.choice(fast)), float(draws.choice(slow))
            if counted:
                count += 1
                local += hit
                seconds += fast_draw if hit else slow_draw
            caches[index].pop(label, None)
            caches[index][label] = None
            if len(caches[index]) > cached_models_per_node:
                caches[index].pop(next(iter(caches[index])))
        totals[aware] = (count, local, seconds)
    return LocalityResult(
        totals[True][0], totals[True][1], totals[False][1], totals[True][2], totals[False][2]
    )


def calibrate_cache(
    trace: ColdStartTrace, cold_events: tuple[tuple[float, str, bool], ...], nodes: int, largest: int = 32
) -> int:
    """The per-node cache size (models) at which cache-blind placement of these cold starts is
    node-local as often as the measured loads are fast: the cache the trace's cluster behaves as."""
    measured = float(np.mean(trace.load_samples < FAST_LOAD_SECONDS))

    def gap(size: int) -> float:
        result = locality_study(trace, cold_events, nodes, size)
        return abs(result.local_without / max(1, result.cold_starts) - measured)

    return min(range(1, largest + 1), key=gap)


# --- Fencing: at most one model awake per GPU, so a wake can wait for a co-resident's execution. ---


@dataclass(frozen=True)
class FencingResult:
    wakes: int
    delayed: int
    """Wakes that found another model of their GPU executing (it cannot be put to sleep mid-run)."""
    woken_waits: np.ndarray
    """Every wake's added TTFT with that delay: the wake plus the rest of the co-resident's run."""


def fencing_check(trace: ColdStartTrace, result: TierResult, sleepers_per_gpu: int) -> FencingResult:
    """The wakes of `result` with the GPU-sharing rule enforced after the fact.

    Models share GPUs `sleepers_per_gpu` at a time, dealt out busiest first in turn so the busy ones
    spread; a model idle but awake is put to sleep at once when another of its GPU must wake (its
    own next request then pays a wake the replay did not count: a bias towards the policy), one that
    is executing holds the GPU until its run ends. The per-model replay ignores this; here each wake
    waits, besides its own wake time, for the longest co-resident execution under way when it
    comes. Queued co-resident runs behind that one are not chained: the delays are a lower bound.
    """
    by_load = sorted(trace.models, key=lambda m: -len(m.arrivals))
    groups = max(1, math.ceil(len(by_load) / sleepers_per_gpu))
    gpu_of = {m.model: i % groups for i, m in enumerate(by_load)}
    runs: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    for start, end, model in result.executions:
        runs[gpu_of[model]].append((start, end, model))
    starts = {g: np.array([r[0] for r in rs]) for g, rs in runs.items()}
    ends = {g: np.array([r[1] for r in rs]) for g, rs in runs.items()}
    models = {g: np.array([r[2] for r in rs]) for g, rs in runs.items()}
    waits, delayed = [], 0
    for t, model, wake in result.wake_events:
        g = gpu_of[model]
        extra = 0.0
        if g in starts:
            busy = (starts[g] <= t) & (ends[g] > t) & (models[g] != model)
            if busy.any():
                extra = float(ends[g][busy].max() - t)
                delayed += 1
        waits.append(wake + extra)
    return FencingResult(len(result.wake_events), delayed, np.array(waits))
