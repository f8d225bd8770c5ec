"""vLLM's sleep mode for the test engine: the endpoints, their semantics and the metrics.

What vLLM does (docs/features/sleep_mode.md and the API server's routes, vLLM 0.11):

- the engine must be started with `--enable-sleep-mode`, and the endpoints exist only when the
  server runs with `VLLM_SERVER_DEV_MODE=1` (they are administrative; without it they are 404);
- `POST /sleep?level=1` (the default level) offloads the weights to host memory and discards the
  KV cache; `level=2` discards both (only buffers stay). 200 with an empty body. Requests in flight
  are aborted (`mode=abort`, the default) or finished first (`mode=wait`);
- `POST /wake_up` restores everything; `?tags=weights` or `?tags=kv_cache` (repeatable) restores
  only those, and the engine counts as sleeping until both are back. After level 2 the weights
  must be reloaded (`/collective_rpc` `reload_weights`): a wake from level 2 takes a load from
  disk, which `wake_seconds` times;
- `GET /is_sleeping` answers `{"is_sleeping": bool}`;
- while asleep, requests that need the weights (`/v1/completions`, `/v1/chat/completions`, ...)
  are refused with 503 and a message saying the model is sleeping (`refusal`); `/v1/models`,
  `/health` and `/metrics` still answer;
- metrics: `vllm:engine_sleep_state{sleep_state="awake"|"weights_offloaded"|"discard_all"}`, 1 for
  the current state. We add where the weights are (`ampacity_engine_weights_bytes{location}`) and
  the KV cache it holds (`ampacity_engine_kv_cache_bytes`), which vLLM only logs.

`SleepMode` is the state machine; `add_routes` mounts the endpoints on an aiohttp application.
The test engine (`ampacity serving engine`) mounts them under `VLLM_SERVER_DEV_MODE=1`; without
`--enable-sleep-mode` they answer as vLLM's do on an engine without it (`/sleep` fails), which is
how the operator learns that an image has no sleep mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from ampacity.serving import tiers

WEIGHTS, KV_CACHE = "weights", "kv_cache"
ABORT, WAIT = "abort", "wait"
TAGS = (WEIGHTS, KV_CACHE)
AWAKE, WEIGHTS_OFFLOADED, DISCARD_ALL = "awake", "weights_offloaded", "discard_all"
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"


class SleepModeError(ValueError):
    """A sleep or wake the engine cannot do (a bad level, a tag it does not know)."""


class SleepMode:
    """One engine's sleep state, memory and the time its transitions take."""

    def __init__(
        self,
        weight_bytes: float,
        kv_cache_bytes: float,
        registry: CollectorRegistry,
        model: str,
        wake_seconds: Callable[[int, float], float] = tiers.wake_seconds,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
        tensor_parallel: int = 1,
        settle: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.weight_bytes, self.kv_cache_bytes = weight_bytes, kv_cache_bytes
        self._wake_seconds, self._pause = wake_seconds, pause
        # Each GPU moves its own shard of the weights, all at once.
        self._shard_bytes = weight_bytes / max(1, tensor_parallel)
        # What happens to the requests in flight before the engine sleeps (`mode`).
        self._settle = settle
        self.level = 0
        """0 awake, else the level it went to sleep at."""
        self.asleep_tags: set[str] = set()
        # From the start of a sleep until it is done, new requests are refused as while asleep.
        self._falling_asleep = False
        self.wakes = 0
        self._lock = asyncio.Lock()
        self._state = Gauge(
            "vllm:engine_sleep_state",
            "Sleep state (1: current): awake, weights_offloaded (level 1), discard_all (level 2)",
            ["engine", "model_name", "sleep_state"],
            registry=registry,
        )
        self._weights = Gauge(
            "ampacity_engine_weights_bytes",
            "Bytes of model weights by where they are: gpu, host (level-1 sleep) or none (level-2 sleep)",
            ["model_name", "location"],
            registry=registry,
        )
        self._kv = Gauge(
            "ampacity_engine_kv_cache_bytes",
            "Bytes of GPU memory the KV cache holds (0 while asleep)",
            ["model_name"],
            registry=registry,
        )
        self.model = model
        self._export()

    @property
    def is_sleeping(self) -> bool:
        return bool(self.asleep_tags)

    @property
    def sleep_state(self) -> str:
        if not self.is_sleeping:
            return AWAKE
        return WEIGHTS_OFFLOADED if self.level == 1 else DISCARD_ALL

    def _export(self) -> None:
        for state in (AWAKE, WEIGHTS_OFFLOADED, DISCARD_ALL):
            self._state.labels("0", self.model, state).set(1.0 if state == self.sleep_state else 0.0)
        weights_asleep = WEIGHTS in self.asleep_tags
        on_gpu = 0.0 if weights_asleep else self.weight_bytes
        on_host = self.weight_bytes if weights_asleep and self.level == 1 else 0.0
        self._weights.labels(self.model, "gpu").set(on_gpu)
        self._weights.labels(self.model, "host").set(on_host)
        self._kv.labels(self.model).set(0.0 if KV_CACHE in self.asleep_tags else self.kv_cache_bytes)

    async def sleep(self, level: int, mode: str = ABORT) -> None:
        if level not in (1, 2):
            raise SleepModeError(f"sleep level must be 1 or 2, not {level}")
        if mode not in (ABORT, WAIT):
            raise SleepModeError(f"sleep mode must be {ABORT} or {WAIT}, not {mode}")
        async with self._lock:
            if self.is_sleeping:
                return  # vLLM: sleeping again changes nothing
            self._falling_asleep = True
            try:
                if self._settle is not None:
                    await self._settle(mode)
                # Level 1 copies the weights out over PCIe; level 2 only frees them.
                await self._pause(self._shard_bytes / 25e9 if level == 1 else 0.0)
                self.level, self.asleep_tags = level, set(TAGS)
            finally:
                self._falling_asleep = False
            self._export()

    async def wake_up(self, tags: list[str] | None = None) -> None:
        wanted = set(TAGS) if not tags else set(tags)
        unknown = wanted - set(TAGS)
        if unknown:
            raise SleepModeError(f"unknown wake-up tags {sorted(unknown)}; vLLM knows {list(TAGS)}")
        async with self._lock:
            waking = wanted & self.asleep_tags
            if not waking:
                return
            if WEIGHTS in waking:
                await self._pause(self._wake_seconds(self.level, self._shard_bytes))
            self.asleep_tags -= waking
            if not self.asleep_tags:
                self.level = 0
                self.wakes += 1
            self._export()

    def refusal(self) -> web.Response | None:
        """The 503 a request that needs the weights gets while the engine sleeps, else None."""
        if not self.is_sleeping and not self._falling_asleep:
            return None
        return web.json_response(
            {
                "error": {
                    "message": f"The model is sleeping (sleep level {self.level or 'pending'});"
                    " POST /wake_up first",
                    "type": "ServiceUnavailableError",
                    "param": None,
                    "code": 503,
                }
            },
            status=503,
        )


NOT_ENABLED = "Sleep mode is not enabled: start the engine with --enable-sleep-mode"


def add_routes(app: web.Application, mode: SleepMode | None) -> None:
    """`POST /sleep`, `POST /wake_up`, `GET /is_sleeping` (mount only under VLLM_SERVER_DEV_MODE=1).

    `mode` None: an engine started without `--enable-sleep-mode`, whose sleep and wake fail (500)
    and which is never sleeping."""

    async def sleep(request: web.Request) -> web.Response:
        if mode is None:
            return web.json_response({"error": NOT_ENABLED}, status=500)
        try:
            await mode.sleep(int(request.query.get("level", "1")), request.query.get("mode", ABORT))
        except (SleepModeError, ValueError) as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.Response(status=200)

    async def wake_up(request: web.Request) -> web.Response:
        if mode is None:
            return web.json_response({"error": NOT_ENABLED}, status=500)
        try:
            await mode.wake_up(request.query.getall("tags", []))
        except SleepModeError as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.Response(status=200)

    async def is_sleeping(_request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": mode is not None and mode.is_sleeping})

    app.router.add_post("/sleep", sleep)
    app.router.add_post("/wake_up", wake_up)
    app.router.add_get("/is_sleeping", is_sleeping)
