"""Discrete-event simulator of a serving pool: disaggregated prefill/decode or colocated.

Iteration-level, like the schedulers it models: an instance runs one forward pass at a time and
the pass's length comes from `LatencyModel`. Scheduling follows vLLM, and the request path is the
one a ServingPool deploys (vllm-router in front of vLLM engines):

- requests are dispatched on arrival, each phase's instances in turn: vllm-router's `round_robin`
  policy (the ServingPool default), which in P/D mode picks a request's prefill and its decode
  engine when the request arrives, with one counter per phase;
- prefill instances batch queued prompts first-come first-served up to a token budget;
- decode instances run continuous batching; a request is admitted when its whole KV footprint
  (prompt + output tokens) fits, so the cache never overflows and nothing is preempted;
- between phases the prompt's KV cache is pulled over the prefill instance's link once the decode
  instance has room (transfers from one prefill instance queue behind each other), as vLLM's
  NixlConnector allocates the decode blocks before it reads them;
- a colocated instance mixes newly admitted prompts and running decodes in one pass (vLLM's
  iteration-level batching), so long prompts stall the decodes sharing their pass.

TTFT ends with the first token the client receives. Colocated, that is the end of the pass that
prefilled the prompt. Disaggregated, vllm-router's two-stage protocol discards the prefill's token
(the prefill request has `max_tokens=1`) and streams the decode engine's, so TTFT runs through the
prefill, the wait for decode memory, the KV pull and the first decode pass the request joins; the
decode engine then generates all of the output tokens. TPOT is the mean gap between the tokens
after the first. Nothing is random: the same pool and workload give the same result.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ampacity.serving.hardware import GpuSpec, ModelSpec
from ampacity.serving.latency import LatencyModel
from ampacity.serving.workload import Workload


@dataclass(frozen=True)
class Slo:
    """Latency objectives, in seconds."""

    ttft: float
    tpot: float


@dataclass(frozen=True)
class Disaggregated:
    """Prefill and decode on separate instances. A phase with 0 instances is simulated alone:
    without prefill instances requests reach decode with their KV cache at arrival, without decode
    instances they end after prefill (the planner sizes each phase this way)."""

    prefill_tp: int
    prefill_instances: int
    decode_tp: int
    decode_instances: int
    kv_bandwidth: float
    """Bytes/s one prefill instance can send KV caches at."""

    @property
    def gpus(self) -> int:
        return self.prefill_tp * self.prefill_instances + self.decode_tp * self.decode_instances


@dataclass(frozen=True)
class Colocated:
    """Instances that each run both phases."""

    tp: int
    instances: int
    chunk: int = 0
    """Chunked prefill (Sarathi-Serve, vLLM's `--enable-chunked-prefill`): at most this many prompt
    tokens per pass, a long prompt spread over several passes beside the running decodes, so no
    pass stalls them for a whole prompt. 0: whole prompts, up to the prefill token budget."""

    @property
    def gpus(self) -> int:
        return self.tp * self.instances


Pool = Disaggregated | Colocated


@dataclass(frozen=True)
class Limits:
    """Scheduler limits: vLLM's `max_num_seqs` default, and a prefill token budget per pass.

    The budget batches short prompts (prefill is compute-bound well before 8k tokens, so larger
    batches only delay the first of them); a longer prompt runs alone.
    """

    max_batch: int = 256
    prefill_tokens: int = 8192


@dataclass(frozen=True)
class SimResult:
    """Per-request latencies (s) and per-instance KV-cache use."""

    ttft: np.ndarray
    tpot: np.ndarray
    finish: np.ndarray
    completions: np.ndarray
    """How many times each request finished (1 for all, or the simulator is wrong)."""
    admitted: np.ndarray
    """When each request got its last phase's slot (decode KV reservation; prefill start without a
    decode phase): how long the pool left it queued."""
    prefill_alone: np.ndarray
    """Each request's prefill time on an otherwise idle instance: a lower bound of its TTFT."""
    kv_peak: np.ndarray
    """Peak KV tokens reserved on each instance that holds decoding requests."""
    kv_capacity: np.ndarray

    def meets(self, slo: Slo) -> np.ndarray:
        return (self.ttft <= slo.ttft) & (self.tpot <= slo.tpot)

    def attainment(self, slo: Slo) -> float:
        """Share of requests meeting both SLOs."""
        return float(np.mean(self.meets(slo))) if len(self.ttft) else 1.0


@dataclass(frozen=True)
class GiveUp:
    """Stop a simulation once more than `misses` of the requests numbered [first, last) have
    missed `slo`: the caller (a goodput search) only needs to know the target is out of reach."""

    slo: Slo
    first: int
    last: int
    misses: int


class _Hopeless(Exception):
    pass


def simulate(
    pool: Pool, workload: Workload, spec: ModelSpec, hw: GpuSpec, limits: Limits | None = None
) -> SimResult:
    """Serve `workload` on `pool`; raises ValueError if an instance cannot hold some request at all."""
    result = simulate_unless(pool, workload, spec, hw, limits, None)
    assert result is not None
    return result


def simulate_unless(
    pool: Pool,
    workload: Workload,
    spec: ModelSpec,
    hw: GpuSpec,
    limits: Limits | None,
    give_up: GiveUp | None,
) -> SimResult | None:
    """`simulate`, or None as soon as `give_up`'s miss budget is spent.

    Past a pool's goodput most of a simulation's time goes to queues that only grow; a search
    that stops there spends its time near the answer instead.
    """
    lim = limits if limits is not None else Limits()
    sim: _Colocated | _Disaggregated
    if isinstance(pool, Colocated):
        sim = _Colocated(pool, workload, spec, hw, lim)
    else:
        sim = _Disaggregated(pool, workload, spec, hw, lim)
    sim.give_up = give_up
    try:
        return sim.run()
    except _Hopeless:
        return None


def _check_fits(what: str, capacity: int, largest: int) -> None:
    if largest > capacity:
        raise ValueError(f"{what} holds {capacity} KV tokens, fewer than the largest request's {largest}")


class _Base:
    """Arrival merging, the event heap and the per-request records shared by both modes."""

    def __init__(self, workload: Workload, lim: Limits) -> None:
        self.lim = lim
        self.arrivals: list[float] = workload.arrivals.tolist()
        self.prompt: list[int] = workload.prompts.tolist()
        self.output: list[int] = workload.outputs.tolist()
        n = len(workload)
        self.first = [np.nan] * n
        self.finish = [np.nan] * n
        self.completions = [0] * n
        self.admitted = [np.nan] * n
        self.events: list[tuple[float, int, int, int]] = []
        self.seq = 0
        self.turns = [0, 0]
        self.give_up: GiveUp | None = None
        self.misses = 0

    def push(self, time: float, kind: int, subject: int) -> int:
        # The sequence number breaks ties in insertion order, which keeps runs deterministic.
        self.seq += 1
        heapq.heappush(self.events, (time, self.seq, kind, subject))
        return self.seq

    def pick(self, instances: int, phase: int) -> int:
        """The instance the next request of `phase` (0: first, 1: decode) goes to: vllm-router's
        round robin, one counter per phase, blind to the instances' load."""
        self.turns[phase] += 1
        return (self.turns[phase] - 1) % instances

    def done(self, r: int, t: float) -> None:
        self.finish[r] = t
        self.completions[r] += 1
        give_up = self.give_up
        if give_up is not None and give_up.first <= r < give_up.last:
            out = self.output[r]
            tpot = (t - self.first[r]) / (out - 1) if out > 1 else 0.0
            if self.first[r] - self.arrivals[r] > give_up.slo.ttft or tpot > give_up.slo.tpot:
                self.misses += 1
                if self.misses > give_up.misses:
                    raise _Hopeless

    def loop(self) -> None:
        arrivals, events, n = self.arrivals, self.events, len(self.arrivals)
        a = 0
        while a < n or events:
            if a < n and (not events or arrivals[a] <= events[0][0]):
                self.arrive(a, arrivals[a])
                a += 1
            else:
                t, seq, kind, subject = heapq.heappop(events)
                self.handle(kind, subject, t, seq)

    def arrive(self, r: int, t: float) -> None:
        raise NotImplementedError

    def handle(self, kind: int, subject: int, t: float, seq: int) -> None:
        raise NotImplementedError

    def result(self, prefill: LatencyModel, kv_peak: list[int], kv_capacity: int) -> SimResult:
        prompts = np.array(self.prompt, dtype=np.float64)
        outputs = np.array(self.output, dtype=np.float64)
        first = np.array(self.first)
        finish = np.array(self.finish)
        ttft = first - np.array(self.arrivals)
        gaps = np.maximum(outputs - 1, 1)
        tpot = np.where(outputs > 1, (finish - first) / gaps, 0.0)
        return SimResult(
            ttft=ttft,
            tpot=tpot,
            finish=finish,
            completions=np.array(self.completions),
            admitted=np.array(self.admitted),
            prefill_alone=np.array([prefill.prefill_time(p, p * p) for p in prompts]),
            kv_peak=np.array(kv_peak),
            kv_capacity=np.full(len(kv_peak), kv_capacity),
        )


_PREFILL_DONE, _TRANSFER_DONE, _RUN_DONE, _PASS_DONE = 0, 1, 2, 3
"""Event kinds: a prefill batch ended, a KV transfer ended, a run of decode passes ended, a
colocated instance's mixed pass ended."""


class _Decoders:
    """Continuous-batching decode state for a set of instances (shared by both modes).

    A request that joins after `steps` passes and owes k more tokens leaves when `steps` reaches
    its finish step; the running context grows by one token per running request per pass.

    Between two changes of an instance's batch (a request leaving, or one waiting to join) its
    passes form a run whose pass times grow linearly with the context, so the run's end is one
    closed-form sum and one event, not one event per pass: that is most of a simulation's events,
    and what makes planning fast. A request that wants to join mid-run cuts the run at the end of
    the pass in flight, which is where the per-pass simulation would have let it in.
    """

    def __init__(self, count: int, lm: LatencyModel, push: Callable[[float, int, int], int]) -> None:
        self.base, self.per_seq, self.per_context = lm.decode_coefficients()
        self.push = push
        self.running = [0] * count
        self.context = [0] * count
        self.steps = [0] * count
        self.leaving: list[list[tuple[int, int]]] = [[] for _ in range(count)]
        self.reserved = [0] * count
        self.admitted = [0] * count
        self.peak = [0] * count
        self.run_start = [0.0] * count
        self.run_passes = [0] * count
        """Passes after which the current run ends."""
        self.due = [-1] * count
        """Sequence number of the event that ends the current run (earlier ones are stale)."""

    def join(self, i: int, r: int, prompt: int, remaining: int) -> None:
        self.running[i] += 1
        self.context[i] += prompt
        heapq.heappush(self.leaving[i], (self.steps[i] + remaining, r))

    def reserve(self, i: int, tokens: int) -> None:
        self.reserved[i] += tokens
        self.admitted[i] += 1
        self.peak[i] = max(self.peak[i], self.reserved[i])

    def _run_end(self, i: int, passes: int) -> float:
        batch = self.running[i]
        first = self.base + self.per_seq * batch + self.per_context * self.context[i]
        return self.run_start[i] + passes * first + self.per_context * batch * passes * (passes - 1) / 2

    def start_run(self, i: int, t: float) -> float:
        """Run passes from `t` until the next request leaves (the batch must not be empty); when
        the run's first pass ends (a later cut never ends a run before its pass in flight)."""
        self.run_start[i] = t
        self.run_passes[i] = self.leaving[i][0][0] - self.steps[i]
        self.due[i] = self.push(self._run_end(i, self.run_passes[i]), _RUN_DONE, i)
        return self._run_end(i, 1)

    def cut_run(self, i: int, t: float) -> None:
        """End the current run with the pass in flight at `t`."""
        elapsed = t - self.run_start[i]
        first = self.base + self.per_seq * self.running[i] + self.per_context * self.context[i]
        growth = self.per_context * self.running[i]
        # Passes completed by `t`: the root of growth/2·n² + (first - growth/2)·n = elapsed.
        if growth > 0:
            b = first - growth / 2
            done = (-b + math.sqrt(b * b + 2 * growth * elapsed)) / growth
        else:
            done = elapsed / first
        passes = max(1, int(done) + 1)
        while passes > 1 and self._run_end(i, passes - 1) > t:
            passes -= 1
        while self._run_end(i, passes) <= t:
            passes += 1
        if passes < self.run_passes[i]:
            self.run_passes[i] = passes
            self.due[i] = self.push(self._run_end(i, passes), _RUN_DONE, i)

    def end_run(self, i: int, seq: int) -> list[int] | None:
        """Advance instance i past its run; the requests that generated their last token, or None
        when the event is stale (the run was cut shorter)."""
        if seq != self.due[i]:
            return None
        passes = self.run_passes[i]
        self.context[i] += self.running[i] * passes
        self.steps[i] += passes
        return self._leavers(i)

    def step_done(self, i: int) -> list[int]:
        """Advance instance i by one pass; the requests that generated their last token."""
        self.steps[i] += 1
        self.context[i] += self.running[i]
        return self._leavers(i)

    def _leavers(self, i: int) -> list[int]:
        leaving = self.leaving[i]
        out = []
        while leaving and leaving[0][0] <= self.steps[i]:
            out.append(heapq.heappop(leaving)[1])
        return out

    def unreserve(self, i: int, tokens: int) -> None:
        self.reserved[i] -= tokens
        self.admitted[i] -= 1

    def release(self, i: int, context: int, footprint: int) -> None:
        """A running request left: its `context` tokens (its prompt and the tokens it decoded
        here) and its reservation are freed."""
        self.running[i] -= 1
        self.context[i] -= context
        self.unreserve(i, footprint)


class _Disaggregated(_Base):
    def __init__(
        self, pool: Disaggregated, workload: Workload, spec: ModelSpec, hw: GpuSpec, lim: Limits
    ) -> None:
        super().__init__(workload, lim)
        if pool.prefill_instances == 0 and pool.decode_instances == 0:
            raise ValueError("a pool needs at least one instance")
        self.pool = pool
        self.pm = LatencyModel(spec, hw, pool.prefill_tp)
        self.dm = LatencyModel(spec, hw, pool.decode_tp)
        self.kv_capacity = self.dm.kv_capacity_tokens()
        if len(workload):
            if pool.prefill_instances:
                _check_fits("a prefill instance", self.pm.kv_capacity_tokens(), int(workload.prompts.max()))
            if pool.decode_instances:
                _check_fits(
                    "a decode instance", self.kv_capacity, int((workload.prompts + workload.outputs).max())
                )
        npf, nd = pool.prefill_instances, pool.decode_instances
        self.queue: list[deque[int]] = [deque() for _ in range(npf)]
        self.batch: list[list[int]] = [[] for _ in range(npf)]
        self.link_free = [0.0] * npf
        self.origin = [-1] * len(workload)
        self.target = [-1] * len(workload)
        self.pending: list[deque[int]] = [deque() for _ in range(nd)]
        self.joining: list[list[int]] = [[] for _ in range(nd)]
        self.busy = [False] * nd
        self.dec = _Decoders(nd, self.dm, self.push)

    def run(self) -> SimResult:
        self.loop()
        return self.result(self.pm, self.dec.peak, self.kv_capacity)

    def arrive(self, r: int, t: float) -> None:
        if self.pool.decode_instances:
            self.target[r] = self.pick(self.pool.decode_instances, 1)
        if not self.pool.prefill_instances:
            self.to_decode(r, t)
            return
        i = self.pick(self.pool.prefill_instances, 0)
        self.queue[i].append(r)
        self.origin[r] = i
        if not self.batch[i]:
            self.start_prefill(i, t)

    def start_prefill(self, i: int, t: float) -> None:
        queue, batch, prompt = self.queue[i], self.batch[i], self.prompt
        tokens = squares = 0
        while queue and (not batch or tokens + prompt[queue[0]] <= self.lim.prefill_tokens):
            r = queue.popleft()
            if not self.pool.decode_instances:
                self.admitted[r] = t
            batch.append(r)
            tokens += prompt[r]
            squares += prompt[r] * prompt[r]
        if batch:
            self.push(t + self.pm.prefill_time(tokens, squares), _PREFILL_DONE, i)

    def to_decode(self, r: int, t: float) -> None:
        j = self.target[r]
        self.pending[j].append(r)
        self.admit(j, t)

    def admit(self, j: int, t: float) -> None:
        pending, dec = self.pending[j], self.dec
        while pending:
            r = pending[0]
            need = self.prompt[r] + self.output[r]
            if dec.reserved[j] + need > self.kv_capacity or dec.admitted[j] >= self.lim.max_batch:
                return
            pending.popleft()
            dec.reserve(j, need)
            self.admitted[r] = t
            i = self.origin[r]
            if i < 0:
                self.joining[j].append(r)
                self.start_decode(j, t)
                continue
            start = max(t, self.link_free[i])
            self.link_free[i] = start + self.dm.kv_transfer_bytes(self.prompt[r]) / self.pool.kv_bandwidth
            self.push(self.link_free[i], _TRANSFER_DONE, r)

    def start_decode(self, j: int, t: float) -> None:
        dec = self.dec
        if self.busy[j]:
            dec.cut_run(j, t)  # joiners wait for the pass in flight to end
            return
        joining = self.joining[j]
        for r in joining:
            # The decode engine generates every output token, the first included.
            dec.join(j, r, self.prompt[r], self.output[r])
        if dec.running[j]:
            self.busy[j] = True
            first = dec.start_run(j, t)
            for r in joining:
                self.first[r] = first
        joining.clear()

    def handle(self, kind: int, subject: int, t: float, seq: int) -> None:
        if kind == _RUN_DONE:
            j = subject
            leavers = self.dec.end_run(j, seq)
            if leavers is None:
                return
            for r in leavers:
                footprint = self.prompt[r] + self.output[r]
                self.dec.release(j, footprint, footprint)
                self.done(r, t)
            self.busy[j] = False
            self.admit(j, t)
            self.start_decode(j, t)
        elif kind == _TRANSFER_DONE:
            j = self.target[subject]
            self.joining[j].append(subject)
            self.start_decode(j, t)
        else:
            i = subject
            finished, self.batch[i] = self.batch[i], []
            for r in finished:
                if self.pool.decode_instances:
                    self.to_decode(r, t)
                else:
                    self.first[r] = t
                    self.done(r, t)
            self.start_prefill(i, t)


class _Colocated(_Base):
    def __init__(
        self, pool: Colocated, workload: Workload, spec: ModelSpec, hw: GpuSpec, lim: Limits
    ) -> None:
        super().__init__(workload, lim)
        self.pool = pool
        self.lm = LatencyModel(spec, hw, pool.tp)
        self.kv_capacity = self.lm.kv_capacity_tokens()
        if len(workload):
            _check_fits("an instance", self.kv_capacity, int((workload.prompts + workload.outputs).max()))
        n = pool.instances
        self.waiting: list[deque[int]] = [deque() for _ in range(n)]
        self.prefilling: list[list[int]] = [[] for _ in range(n)]
        self.busy = [False] * n
        self.dec = _Decoders(n, self.lm, self.push)
        # Chunked prefill: prompt tokens computed so far, and the request whose prompt is unfinished.
        self.computed = [0] * len(workload)
        self.partial = [-1] * n

    def run(self) -> SimResult:
        self.loop()
        return self.result(self.lm, self.dec.peak, self.kv_capacity)

    def arrive(self, r: int, t: float) -> None:
        i = self.pick(self.pool.instances, 0)
        self.waiting[i].append(r)
        if not self.busy[i]:
            self.start_pass(i, t)
        elif len(self.waiting[i]) == 1 and not self.prefilling[i]:
            # A run of decode passes is in flight: the newcomer may join at the next pass.
            self.dec.cut_run(i, t)

    def start_pass(self, i: int, t: float) -> None:
        if self.pool.chunk:
            self.start_chunked_pass(i, t)
            return
        waiting, new, dec, prompt = self.waiting[i], self.prefilling[i], self.dec, self.prompt
        tokens = squares = 0
        while waiting:
            r = waiting[0]
            need = prompt[r] + self.output[r]
            if dec.reserved[i] + need > self.kv_capacity or dec.admitted[i] >= self.lim.max_batch:
                break
            if new and tokens + prompt[r] > self.lim.prefill_tokens:
                break
            waiting.popleft()
            dec.reserve(i, need)
            self.admitted[r] = t
            new.append(r)
            tokens += prompt[r]
            squares += prompt[r] * prompt[r]
        if new:
            self.busy[i] = True
            dt = self.lm.mixed_time(tokens, squares, dec.running[i], dec.context[i])
            self.push(t + dt, _PASS_DONE, i)
        elif dec.running[i]:
            # Nothing can join before a request leaves or arrives: decode passes until then.
            self.busy[i] = True
            dec.start_run(i, t)

    def start_chunked_pass(self, i: int, t: float) -> None:
        """The unfinished prompt first, then new prompts, `chunk` prompt tokens in all."""
        waiting, new, dec, prompt, computed = (
            self.waiting[i],
            self.prefilling[i],
            self.dec,
            self.prompt,
            self.computed,
        )
        budget, tokens, squares = self.pool.chunk, 0, 0
        candidates = [self.partial[i]] if self.partial[i] >= 0 else []
        self.partial[i] = -1
        while budget > 0:
            if candidates:
                r = candidates.pop()
            elif waiting:
                r = waiting[0]
                need = prompt[r] + self.output[r]
                if dec.reserved[i] + need > self.kv_capacity or dec.admitted[i] >= self.lim.max_batch:
                    break
                waiting.popleft()
                dec.reserve(i, need)
                self.admitted[r] = t
            else:
                break
            done = computed[r]
            part = min(budget, prompt[r] - done)
            computed[r] = done + part
            # Causal attention of the chunk over the prompt so far: the n² term's share.
            tokens, squares, budget = tokens + part, squares + (done + part) ** 2 - done**2, budget - part
            new.append(r)
        if new:
            self.busy[i] = True
            dt = self.lm.mixed_time(tokens, squares, dec.running[i], dec.context[i])
            self.push(t + dt, _PASS_DONE, i)
        elif dec.running[i]:
            self.busy[i] = True
            dec.start_run(i, t)

    def handle(self, kind: int, subject: int, t: float, seq: int) -> None:
        i, dec = subject, self.dec
        leavers = dec.step_done(i) if kind == _PASS_DONE else dec.end_run(i, seq)
        if leavers is None:
            return
        for r in leavers:
            # The prefill pass produced the first token: the decodes added output - 1.
            dec.release(i, self.prompt[r] + self.output[r] - 1, self.prompt[r] + self.output[r])
            self.done(r, t)
        prefilled, self.prefilling[i] = self.prefilling[i], []
        for r in prefilled:
            if self.pool.chunk and self.computed[r] < self.prompt[r]:
                self.partial[i] = r  # more chunks to go: no first token yet
                continue
            self.first[r] = t
            if self.output[r] == 1:
                dec.unreserve(i, self.prompt[r] + 1)
                self.done(r, t)
            else:
                dec.join(i, r, self.prompt[r], self.output[r] - 1)
        self.busy[i] = False
        self.start_pass(i, t)
