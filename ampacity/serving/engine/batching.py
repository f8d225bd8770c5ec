"""Continuous batching on one engine instance, timed by the calibrated latency model.

The rules are the simulator's (`ampacity.serving.simulator`), run in real time: a pass admits
waiting prompts first-come first-served while their whole KV footprint (prompt + max tokens) fits,
up to `Limits.max_batch` sequences and `Limits.prefill_tokens` new prompt tokens, and lasts
`LatencyModel.mixed_time` of its new prompt tokens and running decodes (a prefill-only pass is
`prefill_time`, a decode-only pass `decode_time`). Each pass yields one token for every running
sequence and the first token of every prompt it prefilled. A sequence whose KV cache arrives from a
prefill engine (`Sequence.remote_kv`) skips the prefill and decodes from its first pass.

Passes are laid on a virtual timeline: a busy engine starts its next pass where the last one was
due to end, not where the event loop woke up, so scheduling jitter does not accumulate into TPOT.
`time_scale` stretches every pass (0.01: a hundred times faster than the model says).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ampacity.serving.latency import LatencyModel
from ampacity.serving.simulator import Limits


class Rejected(ValueError):
    """The request can never run on this engine (its KV footprint exceeds the whole cache)."""


@dataclass(eq=False)
class Sequence:
    """One request in the engine. `tokens` receives each generated token's time, then None."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    remote_kv: bool = False
    arrival: float = field(default_factory=time.monotonic)
    tokens: asyncio.Queue[float | None] = field(default_factory=asyncio.Queue)
    generated: int = 0
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    finish_reason: str | None = None
    aborted: bool = False

    @property
    def footprint(self) -> int:
        return self.prompt_tokens + self.max_tokens


@dataclass
class BatchStats:
    running: int
    waiting: int
    kv_usage: float


class Batcher:
    """The scheduler loop of one engine; `submit` a sequence, read its tokens from `Sequence.tokens`."""

    def __init__(
        self,
        latency: LatencyModel,
        limits: Limits | None = None,
        time_scale: float = 1.0,
        on_token: Callable[[Sequence, float], None] | None = None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.latency, self.limits, self.time_scale = latency, limits or Limits(), time_scale
        self.kv_capacity = latency.kv_capacity_tokens()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserved = 0
        #: KV tokens held for other engines to read (a prefill engine's finished prompts).
        self.held = 0
        self._wake = asyncio.Event()
        #: Set while nothing runs or waits (what a sleep with mode=wait waits for).
        self.idle = asyncio.Event()
        self.idle.set()
        self._on_token = on_token
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def stats(self) -> BatchStats:
        used = self.reserved + self.held
        return BatchStats(
            len(self.running), len(self.waiting), used / self.kv_capacity if self.kv_capacity else 1
        )

    def submit(self, seq: Sequence) -> None:
        if seq.footprint > self.kv_capacity:
            raise Rejected(
                f"This model's maximum context length is {self.kv_capacity} tokens. However, you requested "
                f"{seq.footprint} tokens ({seq.prompt_tokens} in the messages, {seq.max_tokens} in the "
                "completion). Please reduce the length of the messages or completion."
            )
        self.waiting.append(seq)
        self.idle.clear()
        self._wake.set()

    def abort(self, seq: Sequence) -> None:
        """The client went away: free the sequence at the next pass boundary."""
        seq.aborted = True
        self._wake.set()

    def hold(self, tokens: int) -> None:
        self.held += tokens

    def release_held(self, tokens: int) -> None:
        self.held = max(0, self.held - tokens)
        self._wake.set()

    def _admit(self, now: float) -> tuple[list[Sequence], int, int]:
        new: list[Sequence] = []
        tokens = squares = 0
        while self.waiting:
            seq = self.waiting[0]
            if seq.aborted:
                self.waiting.popleft()
                self._finish(seq, "abort", now)
                continue
            if self.reserved + self.held + seq.footprint > self.kv_capacity:
                break
            if len(self.running) + len(new) >= self.limits.max_batch:
                break
            prompt = 0 if seq.remote_kv else seq.prompt_tokens
            if new and tokens + prompt > self.limits.prefill_tokens:
                break
            self.waiting.popleft()
            self.reserved += seq.footprint
            seq.scheduled = now
            new.append(seq)
            tokens += prompt
            squares += prompt * prompt
        return new, tokens, squares

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        seq.finish_reason, seq.finished = reason, now
        seq.tokens.put_nowait(None)

    def _pass_time(self, new: list[Sequence], tokens: int, squares: int) -> float:
        decoding = [s for s in self.running] + [s for s in new if s.remote_kv]
        context = sum(s.prompt_tokens + s.generated for s in decoding)
        if tokens:
            return self.latency.mixed_time(tokens, squares, len(decoding), context)
        return self.latency.decode_time(len(decoding), context)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            self._drop_aborted(time.monotonic())
            new, tokens, squares = self._admit(time.monotonic())
            if not new and not self.running:
                self.idle.set()
                self._wake.clear()
                await self._wake.wait()
                due = loop.time()
                continue
            start = max(due, loop.time() - 0.05)  # a long stall is not made up for by rushing
            due = start + self._pass_time(new, tokens, squares) * self.time_scale
            await asyncio.sleep(max(0.0, due - loop.time()))
            self._pass_done(new, time.monotonic())

    def _drop_aborted(self, now: float) -> None:
        for seq in [s for s in self.running if s.aborted]:
            self.running.remove(seq)
            self.reserved -= seq.footprint
            self._finish(seq, "abort", now)

    def _emit(self, seq: Sequence, now: float) -> None:
        seq.generated += 1
        if seq.first_token is None:
            seq.first_token = now
        if self._on_token is not None:
            self._on_token(seq, now)
        seq.tokens.put_nowait(now)

    def _pass_done(self, new: list[Sequence], now: float) -> None:
        for seq in self.running + new:
            self._emit(seq, now)
        for seq in new:
            self.running.append(seq)
        for seq in [s for s in self.running if s.generated >= s.max_tokens]:
            self.running.remove(seq)
            self.reserved -= seq.footprint
            self._finish(seq, "length", now)


def kv_transfer_seconds(latency: LatencyModel, prompt_tokens: int, bandwidth: float) -> float:
    """Time to pull a prompt's KV cache over a link of `bandwidth` bytes/s (0 for an infinite link)."""
    if math.isinf(bandwidth):
        return 0.0
    return latency.kv_transfer_bytes(prompt_tokens) / bandwidth
