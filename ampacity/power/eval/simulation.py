"""Row-level evaluation of the policy: how many servers fit under one breaker?

A row of servers (8 GPUs each) shares one PowerBudget. Inference servers (high priority)
serve Llama-2-70B on 8 H100 with the Splitwise-profiled speeds, each replaying the Azure
LLM conversation trace (2023) from its own random offset, so bursts are real but not
synchronised across servers. Training servers (low priority) draw the compute-bound power
steadily. Every `telemetry_interval_s` the policy sees per-GPU power and its caps take
effect `actuation_delay_s` later (agent publish, controller round, agent NVML call).

The serving model is deliberately small and self-contained (fluid queues per server,
stepped every `step_s`): prompts queue FIFO and are processed at the profiled prompt rate
times the cap curve; decoding runs at the profiled time per output token for the current
batch. Decode occupancy comes from uncapped timings, a good approximation while inference
caps stay above the 380 W token-phase power (then decode is never slowed).

With `Actuator.CLOCK_LOCK` a capped GPU is also clock-locked at the clock where compute-bound
work draws its cap (`gpu_model`): every phase's draw scales with the clock (the power limit
stays as the backstop), prompts and training run at the clock fraction, and decoding keeps
full speed down to `TOKEN_CLOCK_KNEE` of the top clock. The decode occupancy then still comes
from uncapped timings, exact while locks stay above the knee.

Latency and throughput costs are measured against the same row run without any cap.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from datetime import datetime

import numpy as np

from ampacity.data import trace_path
from ampacity.power.budget import Actuator, BudgetSpec, PriorityClass
from ampacity.power.calibration import FloatArray, ServingProfile, splitwise_h100_llama70b
from ampacity.power.gpu_model import (
    H100_SXM,
    TOKEN_CLOCK_KNEE,
    ZEUS_CAP_CURVE,
    GpuSpec,
    clock_power_fraction,
    drawn_watts,
    speed,
)
from ampacity.power.policy import EventKind, PolicyState, evaluate
from ampacity.power.telemetry import GpuId, GpuTelemetry

INFERENCE = "inference"
TRAINING = "training"


def row_budget(
    limit_watts: float,
    *,
    training_min_cap_watts: float = 350.0,
    inference_min_cap_watts: float = 500.0,
    t1_fraction: float = 0.85,
    t2_fraction: float = 0.95,
    actuator: Actuator = Actuator.POWER_LIMIT,
) -> BudgetSpec:
    """The budget the evaluation runs under: training low priority, inference high."""
    return BudgetSpec(
        actuator=actuator,
        limit_watts=limit_watts,
        classes=(
            PriorityClass(TRAINING, rank=0, min_cap_watts=training_min_cap_watts),
            PriorityClass(INFERENCE, rank=1, min_cap_watts=inference_min_cap_watts),
        ),
        t1_fraction=t1_fraction,
        t2_fraction=t2_fraction,
    )


@dataclass(frozen=True)
class RowConfig:
    """One simulated row. `servers` of which `training_fraction` run training (interleaved
    by index, so the first N servers of any row have the same mix)."""

    budget: BudgetSpec
    servers: int
    training_fraction: float = 0.5
    gpus_per_server: int = 8
    duration_s: float = 1800.0
    warmup_s: float = 60.0
    step_s: float = 0.5
    telemetry_interval_s: float = 2.0
    actuation_delay_s: float = 2.0
    # Arrival-rate multiplier on the Azure trace per inference server. At 1.0 (5.5 req/s on
    # one 8-GPU Llama-2-70B server) prompts queue for tens of seconds at p99; 0.5 keeps
    # p99 time to first token near one second, a load an operator would actually run.
    load_scale: float = 0.5
    seed: int = 0
    policy: bool = True

    def __post_init__(self) -> None:
        if self.servers < 1 or self.gpus_per_server < 1:
            raise ValueError("need at least one server with at least one GPU")
        if not 0 <= self.training_fraction <= 1:
            raise ValueError("training_fraction must be within [0, 1]")
        if self.step_s <= 0 or self.telemetry_interval_s < self.step_s or self.actuation_delay_s < 0:
            raise ValueError("need step_s > 0, telemetry_interval_s >= step_s, actuation_delay_s >= 0")
        if self.load_scale <= 0 or self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("load_scale and duration_s must be positive, warmup_s non-negative")

    def is_training(self, server: int) -> bool:
        f = self.training_fraction
        return math.floor((server + 1) * f + 1e-9) > math.floor(server * f + 1e-9)

    @property
    def nameplate_watts_per_server(self) -> float:
        return self.gpus_per_server * H100_SXM.max_limit_watts


@dataclass(frozen=True)
class Trace:
    """Request arrivals of the Azure conversation trace, seconds from its first request."""

    arrival_s: FloatArray
    prompt_tokens: FloatArray
    output_tokens: FloatArray

    @property
    def span_s(self) -> float:
        return float(self.arrival_s[-1])


def load_azure_conv() -> Trace:
    """AzureLLMInferenceTrace_conv.csv (Azure/AzurePublicDataset, CC-BY-4.0)."""
    stamps: list[float] = []
    prompts: list[float] = []
    outputs: list[float] = []
    with trace_path("azure-llm-2023", "AzureLLMInferenceTrace_conv.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            # Timestamps carry 7 fractional digits; fromisoformat wants at most 6.
            stamps.append(datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp())
            prompts.append(float(row["ContextTokens"]))
            outputs.append(float(row["GeneratedTokens"]))
    order = np.argsort(stamps, kind="stable")
    t = np.array(stamps)[order]
    return Trace(t - t[0], np.array(prompts)[order], np.array(outputs)[order])


@dataclass(frozen=True)
class RowRun:
    """Time series and costs of one simulated row."""

    config: RowConfig
    times_s: FloatArray
    row_watts: FloatArray
    server_watts: FloatArray  # (servers, steps)
    latency_s: FloatArray  # end-to-end latency of every inference request
    ttft_s: FloatArray  # time to first token of every inference request
    training_speed: float  # mean throughput fraction of training GPUs (1 = uncapped)
    threshold_events: int  # EnteredT1 + EnteredT2 events the policy emitted
    cap_changes: int  # (GPU, round) pairs whose assigned cap changed

    @property
    def peak_watts(self) -> float:
        return float(self.row_watts.max())

    @property
    def overruns(self) -> tuple[int, float]:
        """(count, total seconds) of row power above the budget's limit."""
        above = self.row_watts > self.config.budget.limit_watts
        starts = int(np.count_nonzero(above[1:] & ~above[:-1])) + int(above[0])
        return starts, float(above.sum()) * self.config.step_s


def simulate(config: RowConfig, trace: Trace | None = None) -> RowRun:
    """Run one row; deterministic for `config.seed`.

    The first `warmup_s` are simulated but not measured: every server starts at once with
    empty queues and no caps, which a real row (whose controller ran all along) never sees.
    """
    trace = trace if trace is not None else load_azure_conv()
    profile = splitwise_h100_llama70b()
    spec = H100_SXM  # the Splitwise serving profile is measured on H100
    dt = config.step_s
    warmup = round(config.warmup_s / dt)
    steps = warmup + round(config.duration_s / dt)
    training = np.array([config.is_training(s) for s in range(config.servers)])
    inference_ids = np.flatnonzero(~training)
    servers = [_InferenceServer.build(config, int(s), trace, profile, steps) for s in inference_ids]

    caps = np.full((config.servers, config.gpus_per_server), spec.max_limit_watts, dtype=np.float64)
    pending: list[tuple[int, FloatArray]] = []
    tick_every = max(1, round(config.telemetry_interval_s / dt))
    delay_steps = round(config.actuation_delay_s / dt)
    state = PolicyState()
    names = [f"server-{s:03d}" for s in range(config.servers)]
    priorities = [TRAINING if t else INFERENCE for t in training]
    threshold_events = cap_changes = 0

    backlog = np.zeros(len(servers))
    queue_ahead = np.zeros((len(servers), steps))
    prompt_speed = np.ones((len(servers), steps))
    decode_speed = np.ones((len(servers), steps))
    arrivals = np.stack([srv.prompt_tokens_per_step for srv in servers]) if servers else np.zeros((0, steps))
    decoding = np.stack([srv.decoding for srv in servers]) if servers else np.zeros((0, steps))
    tokens_per_s = 1.0 / profile.seconds_per_prompt_token
    server_watts = np.zeros((config.servers, steps))
    interval_energy = np.zeros(caps.shape)
    train_speed_sum = 0.0

    clocked = config.budget.actuator == Actuator.CLOCK_LOCK
    for k in range(steps):
        while pending and pending[0][0] <= k:
            caps = pending.pop(0)[1]
        server_cap = caps.min(axis=1)  # tensor/data parallel: the slowest GPU sets the pace
        locks = _Locks(spec, caps, clocked)
        server_locks = _Locks(spec, server_cap, clocked)

        prompt_busy_gpu = np.ones((config.servers, 1))  # training: compute-bound all the time
        token_busy_gpu = np.zeros((config.servers, 1))
        if servers:
            f_p = server_locks.speed(spec.prompt_watts, True)[inference_ids]
            f_d = server_locks.speed(spec.token_watts, False)[inference_ids]
            queue_ahead[:, k] = backlog
            prompt_speed[:, k] = f_p
            decode_speed[:, k] = f_d
            backlog += arrivals[:, k]
            capacity = tokens_per_s * f_p * dt
            done = np.minimum(backlog, capacity)
            backlog -= done
            prompt_busy = done / capacity
            prompt_busy_gpu[inference_ids, 0] = prompt_busy
            token_busy_gpu[inference_ids, 0] = np.minimum(1.0, decoding[:, k]) * (1.0 - prompt_busy)
        demand = (
            spec.idle_watts
            + prompt_busy_gpu * (locks.phase_watts(spec.prompt_watts) - spec.idle_watts)
            + token_busy_gpu * (locks.phase_watts(spec.token_watts) - spec.idle_watts)
        )
        gpu_watts = drawn_watts(demand, caps)
        server_watts[:, k] = gpu_watts.sum(axis=1)
        interval_energy += gpu_watts * dt
        if training.any() and k >= warmup:
            train_speed_sum += float(server_locks.speed(spec.training_watts, True)[training].mean())

        if config.policy and k % tick_every == 0:
            now = k * dt
            # Agents publish average power over their interval (energy counter delta / time),
            # which is what NVML's energy counter gives and what a breaker integrates.
            average = interval_energy / (min(k + 1, tick_every) * dt)
            interval_energy = np.zeros(caps.shape)
            samples = [
                GpuTelemetry(
                    GpuId(names[s], g),
                    float(average[s, g]),
                    float(caps[s, g]),
                    spec.min_limit_watts,
                    spec.max_limit_watts,
                    priorities[s],
                    now,
                )
                for s in range(config.servers)
                for g in range(config.gpus_per_server)
            ]
            result = evaluate(config.budget, samples, state, now)
            state = result.state
            if k >= warmup:
                threshold_events += sum(
                    1 for e in result.events if e.kind in (EventKind.ENTERED_T1, EventKind.ENTERED_T2)
                )
            assigned = np.array([a.cap_watts for a in result.assignments], dtype=np.float64).reshape(
                caps.shape
            )
            latest = pending[-1][1] if pending else caps
            if k >= warmup:
                cap_changes += int(np.count_nonzero(assigned != latest))
            pending.append((k + delay_steps, assigned))

    latency, ttft = _latencies(
        servers, queue_ahead, prompt_speed, decode_speed, profile, tokens_per_s, warmup
    )
    measured = server_watts[:, warmup:]
    return RowRun(
        config=config,
        times_s=np.arange(steps - warmup, dtype=np.float64) * dt,
        row_watts=measured.sum(axis=0),
        server_watts=measured,
        latency_s=latency,
        ttft_s=ttft,
        training_speed=train_speed_sum / (steps - warmup) if training.any() else 1.0,
        threshold_events=threshold_events,
        cap_changes=cap_changes,
    )


class _Locks:
    """The clock locks that go with caps (none under POWER_LIMIT), as draw and speed factors."""

    def __init__(self, spec: GpuSpec, caps: FloatArray, clocked: bool) -> None:
        self.spec, self.caps, self.clocked = spec, caps, clocked
        capped = caps < spec.max_limit_watts
        clock = ZEUS_CAP_CURVE(caps / spec.max_limit_watts) if clocked else np.ones_like(caps)
        self.clock = np.where(capped, clock, 1.0)
        self.power_fraction = clock_power_fraction(self.clock)

    def phase_watts(self, watts: float) -> FloatArray:
        """A phase's uncapped draw at each lock (never below idle)."""
        return np.maximum(self.spec.idle_watts, watts * self.power_fraction)

    def speed(self, watts: float, compute_bound: bool) -> FloatArray:
        """Throughput fraction of a phase under each cap and its lock."""
        clock_speed = self.clock if compute_bound else np.minimum(1.0, self.clock / TOKEN_CLOCK_KNEE)
        return np.asarray(speed(self.phase_watts(watts), self.caps) * clock_speed, dtype=np.float64)


@dataclass(frozen=True)
class _InferenceServer:
    """The requests one inference server receives, binned onto the simulation steps."""

    step: np.ndarray  # step index of each request's arrival
    prompt_tokens: FloatArray
    output_tokens: FloatArray
    prompt_tokens_per_step: FloatArray
    decoding: FloatArray  # requests in the decode phase at each step (uncapped timings)
    tpot_s: FloatArray = field(repr=False)  # uncapped time per output token at each step

    @staticmethod
    def build(
        config: RowConfig, server: int, trace: Trace, profile: ServingProfile, steps: int
    ) -> _InferenceServer:
        span = trace.span_s / config.load_scale
        if steps * config.step_s > span:
            raise ValueError(
                f"warmup + duration {steps * config.step_s:.0f}s exceed the trace at this load ({span:.0f}s)"
            )
        rng = np.random.default_rng([config.seed, server])
        shifted = (trace.arrival_s / config.load_scale + rng.uniform(0.0, span)) % span
        keep = shifted < steps * config.step_s
        order = np.argsort(shifted[keep], kind="stable")
        arrival = shifted[keep][order]
        prompts = trace.prompt_tokens[keep][order]
        outputs = trace.output_tokens[keep][order]
        step = np.minimum((arrival / config.step_s).astype(np.int64), steps - 1)
        per_step = np.bincount(step, weights=prompts, minlength=steps).astype(np.float64)
        # Decode occupancy by fixed point: durations depend on the batch they share.
        tpot = np.full(steps, profile.seconds_per_output_token[0])
        decoding = np.zeros(steps)
        start = arrival + profile.prompt_overhead_s + prompts * profile.seconds_per_prompt_token
        for _ in range(3):
            end = start + outputs * tpot[np.minimum((start / config.step_s).astype(np.int64), steps - 1)]
            first = np.minimum((start / config.step_s).astype(np.int64), steps)
            last = np.minimum((end / config.step_s).astype(np.int64), steps)
            delta = np.bincount(first, minlength=steps + 1) - np.bincount(last, minlength=steps + 1)
            decoding = np.cumsum(delta)[:steps].astype(np.float64)
            tpot = profile.time_per_output_token(decoding)
        return _InferenceServer(step, prompts, outputs, per_step, decoding, tpot)


def _latencies(
    servers: list[_InferenceServer],
    queue_ahead: FloatArray,
    prompt_speed: FloatArray,
    decode_speed: FloatArray,
    profile: ServingProfile,
    tokens_per_s: float,
    warmup: int,
) -> tuple[FloatArray, FloatArray]:
    """Per request: wait for the prompt backlog ahead of it, run its own prompt, then
    decode; each at the speed its server's cap allowed when it arrived. Requests that
    arrived during the warm-up are not counted."""
    latencies: list[FloatArray] = []
    ttfts: list[FloatArray] = []
    for i, srv in enumerate(servers):
        measured = srv.step >= warmup
        k = srv.step[measured]
        prompts = srv.prompt_tokens[measured]
        outputs = srv.output_tokens[measured]
        f_p = prompt_speed[i, k]
        ttft = (queue_ahead[i, k] + prompts) / (tokens_per_s * f_p) + profile.prompt_overhead_s
        decode = outputs * srv.tpot_s[k] / decode_speed[i, k]
        ttfts.append(ttft)
        latencies.append(ttft + decode)
    if not latencies:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(latencies), np.concatenate(ttfts)


@dataclass(frozen=True)
class Comparison:
    """A policy-controlled row against the same row with no cap at all."""

    capped: RowRun
    uncapped: RowRun

    @property
    def p99_latency_increase(self) -> float:
        return _relative_increase(self.capped.latency_s, self.uncapped.latency_s)

    @property
    def p99_ttft_increase(self) -> float:
        return _relative_increase(self.capped.ttft_s, self.uncapped.ttft_s)

    @property
    def training_throughput_loss(self) -> float:
        return 1.0 - self.capped.training_speed / self.uncapped.training_speed


def _relative_increase(capped: FloatArray, uncapped: FloatArray) -> float:
    if capped.size == 0:
        return 0.0
    return float(np.percentile(capped, 99) / np.percentile(uncapped, 99) - 1.0)


def compare(config: RowConfig, trace: Trace | None = None) -> Comparison:
    """Simulate the row with the policy and without any cap."""
    trace = trace if trace is not None else load_azure_conv()
    return Comparison(
        simulate(replace(config, policy=True), trace), simulate(replace(config, policy=False), trace)
    )


@dataclass(frozen=True)
class Criteria:
    """What counts as 'fits': no time above the limit and bounded performance loss
    (p99 end-to-end latency and p99 time to first token of high-priority requests, and
    throughput of low-priority training, each relative to the uncapped row)."""

    max_p99_latency_increase: float = 0.05
    max_training_throughput_loss: float = 0.10

    def accepts(self, c: Comparison) -> bool:
        return (
            c.capped.overruns[1] == 0
            and c.p99_latency_increase <= self.max_p99_latency_increase
            and c.p99_ttft_increase <= self.max_p99_latency_increase
            and c.training_throughput_loss <= self.max_training_throughput_loss
        )


@dataclass(frozen=True)
class FitResult:
    """Servers that fit under the budget three ways, and the run at the policy's count."""

    nameplate_servers: int  # provisioned at 8 x max GPU limit
    peak_servers: int  # largest row whose uncapped simulated peak stays under the limit
    policy_servers: int  # largest row the policy keeps under the limit within the criteria
    best: Comparison
    tried: tuple[tuple[int, bool], ...]  # (servers, accepted) in search order


def fit_servers(config: RowConfig, criteria: Criteria, trace: Trace | None = None) -> FitResult:
    """Search the largest server count the policy accepts (`config.servers` is ignored).

    Starts at the nameplate count, doubles the step up until a row fails, then bisects;
    this assumes acceptance is monotone in the server count. Adding a server only adds
    power (the first N servers are the same in every row), so it should be; `tried`
    records every probe, so a violation would be visible.
    """
    trace = trace if trace is not None else load_azure_conv()
    limit = config.budget.limit_watts
    nameplate = max(1, int(limit // config.nameplate_watts_per_server))
    upper = 3 * nameplate
    uncapped = simulate(replace(config, servers=upper, policy=False), trace)
    cumulative_peak = np.cumsum(uncapped.server_watts, axis=0).max(axis=1)
    peak = int(np.count_nonzero(cumulative_peak <= limit))

    tried: list[tuple[int, bool]] = []
    results: dict[int, Comparison] = {}

    def accepted(n: int) -> bool:
        results[n] = compare(replace(config, servers=n), trace)
        ok = criteria.accepts(results[n])
        tried.append((n, ok))
        return ok

    good = nameplate if accepted(nameplate) else 0
    bad: int | None = None
    step = 1
    while bad is None and good > 0:
        candidate = min(upper, good + step)
        if accepted(candidate):
            good = candidate
            step *= 2
            if good == upper:
                break
        else:
            bad = candidate
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        if accepted(middle):
            good = middle
        else:
            bad = middle
    best = results[good] if good else results[nameplate]
    return FitResult(nameplate, peak, good, best, tuple(tried))
