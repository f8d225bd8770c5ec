"""Re-planning a running pool from its live metrics: which phase to scale, and when.

The planner (`planner.plan`) fixes a pool's shape: TP per phase and the prefill:decode ratio that
balances them at the planned mix of prompt and output lengths, with the goodput the pool sustains.
Between plans the load moves, and `decide` resizes each phase from what the engines report:

- demand per phase, in requests/s of the planned mix: the prompt-token rate over the planned mean
  prompt for prefill, the output-token rate over the planned mean output for decode (the request
  rate when token rates are unknown). A burst of long prompts then grows prefill only, a shift to
  long answers decode only, the split DistServe (Zhong et al., OSDI 2024) plans for;
- scale up at once when a phase's demand passes its capacity less a headroom, or when that
  phase's latency misses its SLO at the 90th percentile (TTFT: prefill, TPOT: decode) even if the
  rates say it should not: the model behind the plan can be wrong, the measurement cannot;
- scale down only to a size whose lower water mark (a larger headroom) the demand stayed under
  for a whole cool-down: the largest lower-mark size seen in the cool-down, as the stabilisation
  window of Kubernetes' HorizontalPodAutoscaler does. The band between the two marks and the
  cool-down are what stop a lull from flapping the pool.

The reconciler keeps `ReplanState` in the pool's status between calls. This module also turns
the engines' Prometheus exposition (vLLM's metric names, the de-facto standard) into observations:
`parse_metrics` reads one scrape, `merge` sums the pool's engines, and `observe` differences two
scrapes into rates and histogram quantiles, as PromQL's `rate` and `histogram_quantile` would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from prometheus_client.parser import text_string_to_metric_families

from ampacity.serving.planner import PoolPlan, replicas_for_rate
from ampacity.serving.simulator import Colocated, Pool, Slo

HEADROOM = 0.1
SCALE_DOWN_HEADROOM = 0.3
COOLDOWN_SECONDS = 300.0
SETTLE_SECONDS = 60.0
QUANTILE = 0.9
LATE_STEP = 0.25

PREFILL, DECODE = "prefill", "decode"

# vLLM metric names (v0 and v1 engines). v1 renamed the TPOT histogram to inter-token latency.
REQUESTS = "vllm:request_success_total"
E2E = "vllm:e2e_request_latency_seconds"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
OUTPUT_TOKENS = "vllm:generation_tokens_total"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
TTFT = "vllm:time_to_first_token_seconds"
TPOT = "vllm:time_per_output_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
REQUEST_TPOT = "vllm:request_time_per_output_token_seconds"


@dataclass(frozen=True)
class Observation:
    """What one planning interval measured on the pool."""

    rate: float
    """Requests/s."""
    prompt_tokens_rate: float | None = None
    output_tokens_rate: float | None = None
    ttft: float | None = None
    """TTFT (s) at the observed quantile (p90), None when no request finished its prefill."""
    tpot: float | None = None


@dataclass(frozen=True)
class PlannedMix:
    """Mean prompt and output tokens of the workload the pool was planned on."""

    prompt: float
    output: float


@dataclass(frozen=True)
class ReplanConfig:
    slo: Slo | None = None
    """Latency SLOs checked against the observed p90s; None: rates only."""
    headroom: float = HEADROOM
    scale_down_headroom: float = SCALE_DOWN_HEADROOM
    cooldown_seconds: float = COOLDOWN_SECONDS
    settle_seconds: float = SETTLE_SECONDS
    """After a scale-up, how long latency misses are not acted on: new instances load, the backlog
    drains. Rate-driven scale-ups are never held back."""
    min_gpus: int = 0
    max_gpus: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.headroom <= self.scale_down_headroom < 1:
            raise ValueError("need 0 <= headroom <= scale_down_headroom < 1")


@dataclass(frozen=True)
class ReplanState:
    """What `decide` remembers between calls (the reconciler keeps it in the pool's status)."""

    since: float | None = None
    """When the first observation came: a scale-down needs a whole cool-down of them."""
    lower_marks: tuple[tuple[float, tuple[int, ...]], ...] = ()
    """(time, instances per phase at the lower water mark) for each observation in the last
    cool-down; phases in `decide`'s order (prefill, decode; or the colocated instances)."""
    scaled_up_at: float | None = None
    """When the pool last grew."""


@dataclass(frozen=True)
class ReplanDecision:
    pool: Pool
    reason: str
    state: ReplanState


def _phases(pool: Pool) -> dict[str, int]:
    if isinstance(pool, Colocated):
        return {"instances": pool.instances}
    return {PREFILL: pool.prefill_instances, DECODE: pool.decode_instances}


def _with(pool: Pool, counts: dict[str, int]) -> Pool:
    if isinstance(pool, Colocated):
        return replace(pool, instances=counts["instances"])
    return replace(pool, prefill_instances=counts[PREFILL], decode_instances=counts[DECODE])


def _gpus_per_instance(pool: Pool, phase: str) -> int:
    if isinstance(pool, Colocated):
        return pool.tp
    return pool.prefill_tp if phase == PREFILL else pool.decode_tp


def _demand(planned: PoolPlan, observed: Observation, mix: PlannedMix | None) -> dict[str, float]:
    """Requests/s of the planned mix that each phase has to serve."""
    prefill = decode = observed.rate
    if mix is not None and observed.prompt_tokens_rate is not None:
        prefill = observed.prompt_tokens_rate / mix.prompt
    if mix is not None and observed.output_tokens_rate is not None:
        decode = observed.output_tokens_rate / mix.output
    if isinstance(planned.pool, Colocated):
        # One instance runs both phases, so the heavier of the two sizes it.
        return {"instances": max(prefill, decode)}
    return {PREFILL: prefill, DECODE: decode}


def _sized(planned: PoolPlan, demand: dict[str, float], headroom: float) -> dict[str, int]:
    """Instances per phase for the demand, each loaded to at most (1 - headroom) of the plan's rate.

    `replicas_for_rate` per phase: each phase scales with its own demand, at the planned TP.
    """
    return {
        phase: _phases(replicas_for_rate(planned, max(rate, 1e-9) / (1 - headroom)))[phase]
        for phase, rate in demand.items()
    }


def _violated(observed: Observation, slo: Slo | None, pool: Pool) -> set[str]:
    """Phases whose latency SLO the observed p90 misses."""
    if slo is None:
        return set()
    late = set()
    if observed.ttft is not None and observed.ttft > slo.ttft:
        late.add(PREFILL)
    if observed.tpot is not None and observed.tpot > slo.tpot:
        late.add(DECODE)
    if isinstance(pool, Colocated) and late:
        return {"instances"}
    return late


def _clamp(pool: Pool, counts: dict[str, int], load: dict[str, float], config: ReplanConfig) -> str:
    """Bring the GPU total within [min_gpus, max_gpus] in place, adding to the busiest phase or
    removing from the idlest (never below one instance); a note for the reason, or ''.

    `load[phase] / counts[phase]` is the phase's utilisation (demand over capacity)."""

    def gpus() -> int:
        return sum(n * _gpus_per_instance(pool, phase) for phase, n in counts.items())

    note = ""
    while config.max_gpus is not None and gpus() > config.max_gpus:
        shrinkable = [p for p in counts if counts[p] > 1]
        if not shrinkable:
            break
        phase = min(shrinkable, key=lambda p: load[p] / counts[p])
        counts[phase] -= 1
        note = f"; capped at {config.max_gpus} GPUs"
    while gpus() < config.min_gpus:
        phase = max(counts, key=lambda p: load[p] / counts[p])
        counts[phase] += 1
        note = f"; raised to the {config.min_gpus}-GPU floor"
    return note


def decide(
    planned: PoolPlan,
    current: Pool,
    observed: Observation,
    now: float,
    state: ReplanState | None = None,
    config: ReplanConfig | None = None,
    mix: PlannedMix | None = None,
) -> ReplanDecision:
    """Instances per phase for the next planning interval, with hysteresis and a cool-down.

    `planned` gives the shape and the goodput per planned pool, `current` the instances running
    or starting now (same TPs), `now` a clock in seconds (only differences matter), `mix` the
    planned mean prompt and output lengths that token rates are compared with. A pool with no
    traffic keeps one instance per phase: scaling to zero is the keep-alive policy's decision.
    """
    cfg = config if config is not None else ReplanConfig()
    previous = state if state is not None else ReplanState()
    have = _phases(current)
    demand = _demand(planned, observed, mix)
    up = _sized(planned, demand, cfg.headroom)
    down = _sized(planned, demand, cfg.scale_down_headroom)
    # A latency miss counts only where the phase is busy (above its lower mark): queueing explains
    # it there, and more instances help. On an idle phase the latency is the requests' own (a long
    # prompt's prefill), which no number of instances shortens. Right after a scale-up the new
    # instances are still loading and the backlog still draining, so misses are not news yet.
    settled = previous.scaled_up_at is None or now - previous.scaled_up_at >= cfg.settle_seconds
    late = {p for p in _violated(observed, cfg.slo, current) if down[p] >= have[p]} if settled else set()

    since = previous.since if previous.since is not None else now
    recent = tuple((t, m) for t, m in previous.lower_marks if t > now - cfg.cooldown_seconds)
    # The largest lower mark of the cool-down: a phase shrinks only to a size the demand stayed
    # under for the whole cool-down (the stabilisation window of Kubernetes' HPA).
    floor = {p: max([down[p], *(m[i] for _, m in recent)]) for i, p in enumerate(have)}
    covered = now - since >= cfg.cooldown_seconds

    counts = dict(have)
    changes = []
    for phase in have:
        target = up[phase]
        if phase in late:
            # A missed SLO means the plan's capacity is off: grow by a quarter, at least one.
            target = max(target, have[phase] + max(1, math.ceil(have[phase] * LATE_STEP)))
        if target > have[phase]:
            why = "p90 latency over SLO" if phase in late else "demand over capacity"
        elif covered and floor[phase] < have[phase]:
            target, why = floor[phase], f"below the lower mark for {cfg.cooldown_seconds:.0f}s"
        else:
            continue
        changes.append(f"{phase} {have[phase]}->{target} ({why})")
        counts[phase] = target
    grew = any(counts[p] > have[p] for p in have)
    # A latency miss is a measured lower mark: the size it grew the phase to holds for a cool-down.
    marks = (*recent, (now, tuple(max(down[p], counts[p]) if p in late else down[p] for p in have)))
    # Demand over one instance's share of the plan's rate: divided by the count, a utilisation.
    planned_counts = _phases(planned.pool)
    load = {p: demand[p] * planned_counts[p] / max(planned.goodput, 1e-12) for p in have}
    reason = ", ".join(changes) if changes else "hold"
    reason += _clamp(current, counts, load, cfg)
    next_state = ReplanState(since, marks, now if grew else previous.scaled_up_at)
    return ReplanDecision(_with(current, counts), reason, next_state)


# --- Prometheus text exposition -----------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    """A cumulative histogram: (upper bound, count of observations <= it), +Inf last."""

    buckets: tuple[tuple[float, float], ...] = ()
    count: float = 0.0
    total: float = 0.0
    """Sum of the observations."""

    def plus(self, other: Histogram) -> Histogram:
        """Two engines' histograms added (same bucket bounds, or one side empty)."""
        if not self.buckets or not other.buckets:
            return other if not self.buckets else self
        if [b for b, _ in self.buckets] != [b for b, _ in other.buckets]:
            raise ValueError("histograms with different buckets cannot be added")
        buckets = tuple((b, c1 + c2) for (b, c1), (_, c2) in zip(self.buckets, other.buckets, strict=True))
        return Histogram(buckets, self.count + other.count, self.total + other.total)

    def minus(self, earlier: Histogram) -> Histogram:
        """Observations since `earlier`; after an engine restart (counts fell) everything is new."""
        if not earlier.buckets or self.count < earlier.count:
            return self
        buckets = tuple((b, c - c0) for (b, c), (_, c0) in zip(self.buckets, earlier.buckets, strict=True))
        return Histogram(buckets, self.count - earlier.count, self.total - earlier.total)

    def quantile(self, q: float) -> float | None:
        """PromQL's `histogram_quantile`: linear within the bucket that crosses q; None if empty.

        A quantile in the +Inf bucket is the largest finite bound, as Prometheus returns.
        """
        if not self.buckets or self.buckets[-1][1] <= 0:
            return None
        rank = q * self.buckets[-1][1]
        lower, below = 0.0, 0.0
        for bound, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(bound):
                    return lower
                if cumulative == below:
                    return bound
                return lower + (bound - lower) * (rank - below) / (cumulative - below)
            lower, below = bound, cumulative
        return lower

    def fraction_within(self, bound: float) -> float | None:
        """Share of observations <= `bound`, linear within the bucket that holds it; None if empty."""
        if not self.buckets or self.buckets[-1][1] <= 0:
            return None
        total = self.buckets[-1][1]
        lower, below = 0.0, 0.0
        for upper, cumulative in self.buckets:
            if bound <= upper:
                if math.isinf(upper):
                    return below / total
                return (below + (cumulative - below) * (bound - lower) / (upper - lower)) / total
            lower, below = upper, cumulative
        return 1.0


@dataclass(frozen=True)
class MetricsSnapshot:
    """One scrape of a pool's engines (counters summed over their label sets)."""

    time: float
    requests: float = 0.0
    prompt_tokens: float = 0.0
    output_tokens: float = 0.0
    running: float = 0.0
    waiting: float = 0.0
    ttft: Histogram = Histogram()
    tpot: Histogram = Histogram()
    request_tpot: Histogram = Histogram()
    """Per-request TPOT (vLLM >= 0.10's vllm:request_time_per_output_token_seconds)."""
    e2e: Histogram = Histogram()


_Sample = tuple[str, dict[str, str], float]


def _histogram(name: str, samples: list[_Sample]) -> Histogram:
    buckets: dict[float, float] = {}
    count = total = 0.0
    for metric, labels, value in samples:
        if metric == name + "_bucket" and "le" in labels:
            bound = float(labels["le"])  # float() reads "+Inf"
            buckets[bound] = buckets.get(bound, 0.0) + value
        elif metric == name + "_count":
            count += value
        elif metric == name + "_sum":
            total += value
    return Histogram(tuple(sorted(buckets.items())), count, total)


def parse_metrics(text: str, time: float) -> MetricsSnapshot:
    """A snapshot from one engine's `/metrics` text (Prometheus exposition format 0.0.4), read with
    `prometheus_client`'s parser.

    Samples of the same metric with different labels (finish reasons, models) are summed. Requests
    are counted by `vllm:request_success_total`, or by the end-to-end latency histogram's count
    when an engine does not export it; TPOT falls back to v1's inter-token latency.
    Raises ValueError on text that is not the exposition format.
    """
    samples: list[_Sample] = [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]
    sums: dict[str, float] = {}
    for metric, _, value in samples:
        sums[metric] = sums.get(metric, 0.0) + value
    requests = sums.get(REQUESTS, sums.get(E2E + "_count", 0.0))
    tpot = _histogram(TPOT, samples)
    return MetricsSnapshot(
        time=time,
        requests=requests,
        prompt_tokens=sums.get(PROMPT_TOKENS, 0.0),
        output_tokens=sums.get(OUTPUT_TOKENS, 0.0),
        running=sums.get(RUNNING, 0.0),
        waiting=sums.get(WAITING, 0.0),
        ttft=_histogram(TTFT, samples),
        tpot=tpot if tpot.buckets else _histogram(ITL, samples),
        request_tpot=_histogram(REQUEST_TPOT, samples),
        e2e=_histogram(E2E, samples),
    )


def merge(snapshots: Iterable[MetricsSnapshot]) -> MetricsSnapshot:
    """The pool's snapshot: its engines' scrapes summed (at the latest scrape time)."""
    merged: MetricsSnapshot | None = None
    for s in snapshots:
        if merged is None:
            merged = s
            continue
        merged = MetricsSnapshot(
            time=max(merged.time, s.time),
            requests=merged.requests + s.requests,
            prompt_tokens=merged.prompt_tokens + s.prompt_tokens,
            output_tokens=merged.output_tokens + s.output_tokens,
            running=merged.running + s.running,
            waiting=merged.waiting + s.waiting,
            ttft=merged.ttft.plus(s.ttft),
            tpot=merged.tpot.plus(s.tpot),
            request_tpot=merged.request_tpot.plus(s.request_tpot),
            e2e=merged.e2e.plus(s.e2e),
        )
    if merged is None:
        raise ValueError("no snapshots to merge")
    return merged


def _increase(now: float, before: float) -> float:
    # A counter that fell was reset (the engine restarted): PromQL's `increase` counts from zero.
    return now - before if now >= before else now


def observe(before: MetricsSnapshot, after: MetricsSnapshot, quantile: float = QUANTILE) -> Observation:
    """Rates and latency quantiles between two snapshots of the same pool."""
    elapsed = after.time - before.time
    if elapsed <= 0:
        raise ValueError("the second snapshot must be later than the first")
    return Observation(
        rate=_increase(after.requests, before.requests) / elapsed,
        prompt_tokens_rate=_increase(after.prompt_tokens, before.prompt_tokens) / elapsed,
        output_tokens_rate=_increase(after.output_tokens, before.output_tokens) / elapsed,
        ttft=after.ttft.minus(before.ttft).quantile(quantile),
        tpot=after.tpot.minus(before.tpot).quantile(quantile),
    )


def _since(after: MetricsSnapshot, before: MetricsSnapshot | None) -> MetricsSnapshot:
    """What one engine counted since `before` (a new engine, or one that restarted: since start)."""
    if before is None or after.requests < before.requests:
        return after
    return MetricsSnapshot(
        time=after.time,
        requests=after.requests - before.requests,
        prompt_tokens=_increase(after.prompt_tokens, before.prompt_tokens),
        output_tokens=_increase(after.output_tokens, before.output_tokens),
        running=after.running,
        waiting=after.waiting,
        ttft=after.ttft.minus(before.ttft),
        tpot=after.tpot.minus(before.tpot),
        request_tpot=after.request_tpot.minus(before.request_tpot),
        e2e=after.e2e.minus(before.e2e),
    )


def pool_increase(
    before: Mapping[str, MetricsSnapshot], after: Mapping[str, MetricsSnapshot]
) -> MetricsSnapshot:
    """The pool's counts between two scrapes of each engine (keyed by pod), as PromQL's
    `sum(increase(...))` would give them: each engine is differenced on its own, so a counter reset
    on one engine (a restart) is not a fall in the pool's counts, an engine that appeared counts
    from its start, and one that went away stops counting. `time` is the latest scrape."""
    if not after:
        raise ValueError("no engines scraped")
    return merge(_since(snapshot, before.get(pod)) for pod, snapshot in after.items())


def observe_pool(
    before: Mapping[str, MetricsSnapshot],
    after: Mapping[str, MetricsSnapshot],
    elapsed: float,
    quantile: float = QUANTILE,
) -> Observation:
    """Rates and latency quantiles of a pool over `elapsed` seconds between two per-engine scrapes."""
    if elapsed <= 0:
        raise ValueError("the second scrape must be later than the first")
    delta = pool_increase(before, after)
    return Observation(
        rate=delta.requests / elapsed,
        prompt_tokens_rate=delta.prompt_tokens / elapsed,
        output_tokens_rate=delta.output_tokens / elapsed,
        ttft=delta.ttft.quantile(quantile),
        tpot=delta.tpot.quantile(quantile),
    )
