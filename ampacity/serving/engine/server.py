"""The engine's HTTP server: vLLM's OpenAI routes, `/health`, `/metrics`, the NIXL side channel, and
vLLM's sleep endpoints (`--enable-sleep-mode`, mounted under `VLLM_SERVER_DEV_MODE=1` as vLLM does)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ampacity.serving import hardware, sleepmode
from ampacity.serving.engine import kv, protocol
from ampacity.serving.engine.batching import Batcher, Rejected, Sequence, kv_transfer_seconds
from ampacity.serving.engine.metrics import EngineMetrics
from ampacity.serving.latency import LatencyModel
from ampacity.serving.simulator import Limits

ROLES = {"colocated": None, "prefill": "kv_producer", "decode": "kv_consumer"}
#: Where the side channel listens, when not on VLLM_NIXL_SIDE_CHANNEL_HOST (a pod binds 0.0.0.0).
SIDE_CHANNEL_BIND_ENV = "AMPACITY_ENGINE_SIDE_CHANNEL_BIND"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(frozen=True)
class EngineConfig:
    model: str
    """What `vllm serve` was given (repo id or local path)."""
    served_model_name: str
    latency_model: str
    gpu: str
    tensor_parallel_size: int = 1
    kv_transfer: kv.KVTransferConfig | None = None
    time_scale: float = 1.0
    kv_bandwidth: float = 50e9
    """Bytes/s a KV pull runs at (the planner's default: one 400 Gb/s NIC)."""
    default_max_tokens: int = 64
    limits: Limits = field(default_factory=Limits)
    side_channel_host: str = "localhost"
    side_channel_port: int = 5600
    request_log: Path | None = None
    max_model_len: int | None = None
    """vLLM's `--max-model-len`: longer requests get its 400 (None: no limit, as no model is loaded)."""
    enable_sleep_mode: bool = False
    dev_mode: bool = False
    """VLLM_SERVER_DEV_MODE=1: the administrative endpoints (sleep, wake) are served."""

    @property
    def role(self) -> str:
        if self.kv_transfer is None:
            return "colocated"
        return {"kv_producer": "prefill", "kv_consumer": "decode"}.get(self.kv_transfer.role, "both")


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.latency = LatencyModel(
            hardware.model(config.latency_model), hardware.gpu(config.gpu), config.tensor_parallel_size
        )
        self.metrics = EngineMetrics(config.served_model_name)
        self.batcher = Batcher(self.latency, config.limits, config.time_scale, on_token=self._on_token)
        role = config.kv_transfer.role if config.kv_transfer else None
        self.producer = (
            kv.Producer(
                kv.new_engine_id(),
                config.side_channel_host,
                config.side_channel_port,
                config.tensor_parallel_size,
                release=self.batcher.release_held,
            )
            if role in kv.PRODUCER_ROLES
            else None
        )
        self.consumes = role in kv.CONSUMER_ROLES
        self.sleep = (
            sleepmode.SleepMode(
                self.latency.spec.weight_bytes,
                self.batcher.kv_capacity * self.latency.spec.kv_bytes_per_token,
                self.metrics.registry,
                config.served_model_name,
                pause=lambda seconds: asyncio.sleep(seconds * config.time_scale),
                tensor_parallel=config.tensor_parallel_size,
                settle=self._settle,
            )
            if config.enable_sleep_mode
            else None
        )
        self.session: aiohttp.ClientSession | None = None
        self.draining = False
        self._side_channel: web.AppRunner | None = None
        self._log = config.request_log.open("a", buffering=1) if config.request_log else None

    # --- timing and metrics --------------------------------------------------------------------

    def _on_token(self, seq: Sequence, now: float) -> None:
        self.metrics.generation_tokens.inc()
        if seq.generated == 1:
            self.metrics.ttft.observe(now - seq.arrival)
            self.metrics.prompt_tokens.inc(seq.prompt_tokens)
        elif seq.last_token is not None:
            self.metrics.itl.observe(now - seq.last_token)
        seq.last_token = now

    def _finished(self, seq: Sequence) -> None:
        if seq.finished is None or seq.finish_reason in (None, "abort"):
            return
        self.metrics.e2e.observe(seq.finished - seq.arrival)
        if seq.scheduled is not None:
            self.metrics.queue_time.observe(seq.scheduled - seq.arrival)
        if seq.generated > 1 and seq.first_token is not None:
            self.metrics.request_tpot.observe((seq.finished - seq.first_token) / (seq.generated - 1))
        self.metrics.success(seq.finish_reason)

    def _record(self, **fields: Any) -> None:
        if self._log is not None:
            self._log.write(json.dumps({"time": time.time(), "role": self.config.role, **fields}) + "\n")

    async def _settle(self, mode: str) -> None:
        """Before a sleep: abort the requests in flight (vLLM's default) or let them finish."""
        if mode == sleepmode.ABORT:
            for seq in [*self.batcher.running, *self.batcher.waiting]:
                self.batcher.abort(seq)
        await self.batcher.idle.wait()

    # --- routes --------------------------------------------------------------------------------

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(status=503 if self.draining else 200)

    async def models(self, _: web.Request) -> web.Response:
        body = protocol.models(self.config.served_model_name, self.config.model, self.batcher.kv_capacity)
        return web.json_response(body)

    async def prometheus(self, _: web.Request) -> web.Response:
        stats = self.batcher.stats()
        self.metrics.running.set(stats.running)
        self.metrics.waiting.set(stats.waiting)
        self.metrics.kv_usage.set(stats.kv_usage)
        return web.Response(
            body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def side_channel_read(self, request: web.Request) -> web.Response:
        if self.producer is None:
            return web.json_response({"error": "not a KV producer"}, status=404)
        body = await request.json()
        ok = self.producer.read(body.get("engine_id"), body.get("request_id"), body.get("block_ids") or [])
        return web.json_response({"ok": ok}, status=200 if ok else 404)

    # --- generation ----------------------------------------------------------------------------

    def _error(self, status: int, kind: str, message: str) -> web.Response:
        return web.json_response(protocol.error(message, kind, status), status=status)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrival = time.monotonic()
        refused = self.sleep.refusal() if self.sleep is not None else None
        if refused is not None:
            self._record(path=request.path, status=503, error="sleeping")
            return refused
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return self._error(400, "BadRequestError", "the request body is not valid JSON")
        try:
            req = protocol.parse(
                body,
                chat,
                self.config.served_model_name,
                self.config.default_max_tokens,
                self.config.max_model_len,
            )
        except protocol.NotFound as err:
            return self._error(404, "NotFoundError", str(err))
        except protocol.InvalidRequest as err:
            return self._error(400, "BadRequestError", str(err))
        header_id = request.headers.get("X-Request-Id")
        rid = protocol.request_id(chat, header_id)
        created = int(time.time())
        params = req.kv_transfer_params or {}
        remote_decode = bool(params.get("do_remote_decode")) and self.producer is not None
        remote_prefill = bool(params.get("do_remote_prefill")) and self.consumes
        seq = Sequence(rid, req.prompt_tokens, req.max_tokens, arrival=arrival)
        log = {
            "request_id": rid,
            "x_request_id": header_id,
            "path": request.path,
            "max_tokens": req.max_tokens,
            "prompt_tokens": req.prompt_tokens,
            "stream": req.stream,
            "kv_transfer_params_in": req.kv_transfer_params,
        }
        response: web.StreamResponse | None = None
        if req.stream:
            response = web.StreamResponse(headers=SSE_HEADERS)
            await response.prepare(request)
        try:
            loaded = await self._load_kv(params) if remote_prefill else None
        except kv.KVLoadError as err:
            self._record(**log, status=500, error=str(err))
            return await self._fail(response, req, 500, "InternalServerError", "Internal server error")
        seq.remote_kv = bool(loaded)
        log["kv_loaded_tokens"] = loaded
        try:
            self.batcher.submit(seq)
        except Rejected as err:
            self._record(**log, status=400, error=str(err))
            return await self._fail(response, req, 400, "BadRequestError", str(err))
        try:
            if response is not None:
                await self._stream(response, req, rid, created, seq)
            else:
                await self._drain(seq)
        except (asyncio.CancelledError, ConnectionResetError):
            self.batcher.abort(seq)
            self._record(**log, status=499, completion_tokens=seq.generated)
            raise
        self._finished(seq)
        out = None
        if remote_decode and seq.finish_reason == "length":
            out = self.producer.finished(rid, req.prompt_tokens) if self.producer else None
            if out and out["remote_block_ids"]:
                self.batcher.hold(len(out["remote_block_ids"]) * kv.BLOCK_SIZE)
        self._record(
            **log,
            status=200,
            completion_tokens=seq.generated,
            kv_transfer_params_out=out,
            queue_seconds=None if seq.scheduled is None else seq.scheduled - arrival,
            ttft_seconds=None if seq.first_token is None else seq.first_token - arrival,
            e2e_seconds=None if seq.finished is None else seq.finished - arrival,
        )
        if response is not None:
            return response
        text = "".join(protocol.token_text(i) for i in range(seq.generated))
        reason = seq.finish_reason or "length"
        return web.json_response(protocol.response(req, rid, created, text, seq.generated, reason, out))

    async def _load_kv(self, params: dict[str, Any]) -> int:
        assert self.session is not None
        blocks = params.get("remote_block_ids") or []
        seconds = kv_transfer_seconds(self.latency, len(blocks) * kv.BLOCK_SIZE, self.config.kv_bandwidth)
        try:
            return await kv.pull(self.session, params, seconds * self.config.time_scale)
        except kv.KVLoadError:
            assert self.config.kv_transfer is not None
            if self.config.kv_transfer.load_failure_policy == "recompute":
                return 0
            raise

    async def _fail(
        self,
        response: web.StreamResponse | None,
        req: protocol.GenerationRequest,
        status: int,
        kind: str,
        msg: str,
    ) -> web.StreamResponse:
        if response is None:
            return self._error(status, kind, msg)
        # A stream has sent its 200 already: vLLM ends it with an error event and [DONE].
        await response.write(f"data: {json.dumps(protocol.error(msg, kind, status))}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _drain(self, seq: Sequence) -> None:
        while await seq.tokens.get() is not None:
            pass

    async def _stream(
        self,
        response: web.StreamResponse,
        req: protocol.GenerationRequest,
        rid: str,
        created: int,
        seq: Sequence,
    ) -> None:
        index = 0
        first = True
        while (stamp := await seq.tokens.get()) is not None:
            del stamp
            last = index + 1 >= seq.max_tokens
            chunk = protocol.chunk(
                req, rid, created, protocol.token_text(index), "length" if last else None, first
            )
            first = False
            index += 1
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if req.include_usage:
            usage = protocol.usage_chunk(req, rid, created, seq.generated)
            await response.write(f"data: {json.dumps(usage)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()

    # --- lifecycle -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        if self.config.dev_mode:
            sleepmode.add_routes(app, self.sleep)
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, _: web.Application) -> None:
        self.batcher.start()
        self.session = aiohttp.ClientSession()
        if self.producer is not None:
            self._side_channel = web.AppRunner(self.side_channel_app())
            await self._side_channel.setup()
            bind = os.environ.get(SIDE_CHANNEL_BIND_ENV, self.config.side_channel_host)
            await web.TCPSite(self._side_channel, bind, self.config.side_channel_port).start()

    async def _shutdown(self, _: web.Application) -> None:
        # SIGTERM: fail readiness, let in-flight requests finish (aiohttp waits for their handlers).
        self.draining = True

    async def _cleanup(self, _: web.Application) -> None:
        await self.batcher.stop()
        if self.session is not None:
            await self.session.close()
        if self._side_channel is not None:
            await self._side_channel.cleanup()
        if self._log is not None:
            self._log.close()

    def side_channel_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(kv.READ_PATH, self.side_channel_read)
        return app


def serve(config: EngineConfig, host: str, port: int, shutdown_timeout: float = 600.0) -> None:
    """Run until SIGTERM or SIGINT; then in-flight requests get `shutdown_timeout` seconds to finish."""
    engine = Engine(config)
    print(f"engine {config.role} serving {config.served_model_name} on {host}:{port}", flush=True)
    web.run_app(engine.app(), host=host, port=port, shutdown_timeout=shutdown_timeout, print=None)
