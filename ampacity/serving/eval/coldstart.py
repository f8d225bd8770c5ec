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
from dataclasses import dataclass

import numpy as np

from ampacity.data import trace_path
from ampacity.serving import keepalive
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
