"""The activator in front of real HTTP engines, driven by the official `openai` client.

The engines here are small aiohttp servers that answer OpenAI chat completions (streamed as SSE
and not) and vLLM's sleep endpoints (`/health`, `/is_sleeping`, `/sleep?level=`, `/wake_up`),
started and stopped by the test: a pool "at zero" is one whose engine is not listening at all.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from ampacity.serving.activator import Activator, EngineProbe, Episode, HoldLimits, Wake, wake_engines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Engine:
    """An OpenAI-compatible engine with vLLM's sleep endpoints; `wake_seconds` is its wake time."""

    def __init__(self, port: int, asleep: bool = False, wake_seconds: float = 0.2) -> None:
        self.port, self.asleep, self.wake_seconds = port, asleep, wake_seconds
        self.requests: list[dict[str, object]] = []
        self.wake_calls = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/is_sleeping", self._is_sleeping)
        app.router.add_post("/sleep", self._sleep)
        app.router.add_post("/wake_up", self._wake_up)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._broken)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _is_sleeping(self, _request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.asleep})

    async def _sleep(self, request: web.Request) -> web.Response:
        self.asleep = int(request.query.get("level", "1")) in (1, 2)
        return web.Response(status=200)

    async def _wake_up(self, _request: web.Request) -> web.Response:
        self.wake_calls += 1
        await asyncio.sleep(self.wake_seconds)
        self.asleep = False
        return web.Response(status=200)

    async def _broken(self, request: web.Request) -> web.StreamResponse:
        """A stream that breaks off after its first chunk (an engine that dies mid-answer)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"id": "cmpl-1", "object": "text_completion", "choices": []}\n\n')
        assert request.transport is not None
        request.transport.close()
        return response

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.asleep:
            return web.json_response({"error": {"message": "the model is sleeping", "code": 503}}, status=503)
        self.requests.append(body)
        words = ["tokens", "from", f"port-{self.port}"]
        base = {"id": "chatcmpl-1", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            return web.json_response(
                base
                | {
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": " ".join(words)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, word in enumerate(words):
            chunk = base | {
                "object": "chat.completion.chunk",
                "choices": [
                    {"index": 0, "delta": {"content": (" " if i else "") + word}, "finish_reason": None}
                ],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.01)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@asynccontextmanager
async def _serving(activator: Activator, port: int) -> AsyncIterator[str]:
    runner = web.AppRunner(activator.app(), shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def _probe_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _client(base: str, retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=retries, timeout=30.0)


async def _ask(client: openai.AsyncOpenAI, stream: bool = False) -> str:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
    if not stream:
        reply = await client.chat.completions.create(model="m", messages=messages)
        return reply.choices[0].message.content or ""
    parts = []
    async for chunk in await client.chat.completions.create(model="m", messages=messages, stream=True):
        parts.append(chunk.choices[0].delta.content or "")
    return "".join(parts)


async def _metric(base: str, name: str, labels: dict[str, str] | None = None) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/activator/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not exported")


def _starting(engine: Engine, load_seconds: float) -> tuple[list[float], Wake]:
    """A wake that starts the stopped engine after `load_seconds` (a cold start), once."""
    calls: list[float] = []

    async def wake() -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            await asyncio.sleep(load_seconds)
            await engine.start()

    return calls, wake


async def test_a_request_to_a_pool_at_zero_completes_after_the_wake_and_its_wait_is_reported() -> None:
    engine = Engine(_free_port())
    calls, wake = _starting(engine, 0.5)
    async with _probe_session() as session:
        probe = EngineProbe({"engine": lambda: [engine.url]}, lambda: session)
        activator = Activator("chat", engine.url, probe, wake, HoldLimits(max_queue=10, max_wait=20.0))
        async with _serving(activator, _free_port()) as base:
            started = time.monotonic()
            assert await _ask(_client(base)) == f"tokens from port-{engine.port}"
            assert time.monotonic() - started >= 0.5
            assert len(calls) == 1 and calls[0] >= started  # the request started the wake
            assert await _metric(base, "ampacity_activator_wait_seconds_count") == 1
            assert await _metric(base, "ampacity_activator_wait_seconds_sum") >= 0.5
            assert await _metric(base, "ampacity_activator_wakes_total") >= 1
            # Once up, a request goes straight through and the wait it reports is short.
            assert await _ask(_client(base), stream=True) == f"tokens from port-{engine.port}"
            assert await _metric(base, "ampacity_activator_requests_total", {"outcome": "proxied"}) == 2
    await engine.stop()


async def test_a_burst_of_50_at_zero_all_complete_streams_included() -> None:
    engine = Engine(_free_port())
    calls, wake = _starting(engine, 0.3)
    async with _probe_session() as session:
        probe = EngineProbe({"engine": lambda: [engine.url]}, lambda: session)
        activator = Activator("chat", engine.url, probe, wake, HoldLimits(max_queue=50, max_wait=20.0))
        async with _serving(activator, _free_port()) as base:
            client = _client(base)
            answers = await asyncio.gather(*(_ask(client, stream=i % 2 == 1) for i in range(50)))
            assert answers == [f"tokens from port-{engine.port}"] * 50
            assert len(engine.requests) == 50
            assert len(calls) == 1  # one wake for the whole burst, not one per request
            assert await _metric(base, "ampacity_activator_wait_seconds_count") == 50
    await engine.stop()


async def test_past_the_wait_or_the_queue_limit_the_answer_is_503_with_a_reason_and_retry_after() -> None:
    engine = Engine(_free_port())  # never started: the wake does nothing

    async def wake() -> None:
        return None

    async with _probe_session() as session:
        probe = EngineProbe({"engine": lambda: [engine.url]}, lambda: session)
        activator = Activator("chat", engine.url, probe, wake, HoldLimits(max_queue=1, max_wait=0.5))
        async with _serving(activator, _free_port()) as base:
            client = _client(base)
            held = asyncio.create_task(_ask(client))
            await asyncio.sleep(0.1)
            with pytest.raises(openai.APIStatusError) as full:
                await _ask(client)
            assert full.value.status_code == 503
            assert "already holds 1 requests (its queue limit, activator.maxQueue=1)" in full.value.message
            assert full.value.response.headers["Retry-After"] == "1"
            with pytest.raises(openai.APIStatusError) as expired:
                await held
            assert expired.value.status_code == 503
            assert "did not become ready within 0.5s" in expired.value.message
            assert await _metric(base, "ampacity_activator_requests_total", {"outcome": "wait-expired"}) == 1
            assert await _metric(base, "ampacity_activator_requests_total", {"outcome": "queue-full"}) == 1


async def test_a_disaggregated_pool_is_up_only_when_prefill_and_decode_both_serve() -> None:
    prefill, decode = Engine(_free_port()), Engine(_free_port(), asleep=True, wake_seconds=0.3)
    await prefill.start()
    await decode.start()
    async with _probe_session() as session:
        probe = EngineProbe(
            {"prefill": lambda: [prefill.url], "decode": lambda: [decode.url]}, lambda: session
        )
        assert not await probe()  # prefill alone is not a pool that serves
        activator = Activator("pd", prefill.url, probe, wake_engines(probe), HoldLimits(max_wait=10.0))
        async with _serving(activator, _free_port()) as base:
            assert await _ask(_client(base)) == f"tokens from port-{prefill.port}"
            assert decode.wake_calls == 1 and prefill.wake_calls == 0
            assert await probe()
    await prefill.stop()
    await decode.stop()


async def test_an_engine_that_goes_away_sends_the_request_back_to_the_hold_until_a_replacement_serves() -> (
    None
):
    port = _free_port()
    first = Engine(port)
    await first.start()
    replacement = Engine(port)
    calls, wake = _starting(replacement, 0.3)
    async with _probe_session() as session:
        probe = EngineProbe({"engine": lambda: [first.url]}, lambda: session)
        activator = Activator(
            "chat",
            first.url,
            probe,
            wake,
            HoldLimits(max_wait=10.0),
            refresh_interval=3600.0,  # the activator still believes the pool is up
        )
        async with _serving(activator, _free_port()) as base:
            assert await _ask(_client(base)) == f"tokens from port-{port}"
            await first.stop()  # the engine dies between two requests
            assert await _ask(_client(base)) == f"tokens from port-{port}"
            assert len(replacement.requests) == 1 and calls
    await replacement.stop()


async def test_an_activator_restart_loses_no_held_request_that_the_client_retries() -> None:
    engine = Engine(_free_port())
    port = _free_port()

    async def no_wake() -> None:
        return None

    calls, wake = _starting(engine, 0.2)
    async with _probe_session() as session:
        probe = EngineProbe({"engine": lambda: [engine.url]}, lambda: session)
        first = Activator("chat", engine.url, probe, no_wake, HoldLimits(max_wait=30.0))
        second = Activator("chat", engine.url, probe, wake, HoldLimits(max_wait=30.0))
        async with _serving(first, port) as base:
            request = asyncio.create_task(_ask(_client(base, retries=5)))
            await asyncio.sleep(0.3)
            assert not request.done()  # held by the first activator
        # The first activator is gone with the request it held; a new one takes the retry.
        async with _serving(second, port):
            assert await asyncio.wait_for(request, 30.0) == f"tokens from port-{engine.port}"
            assert calls
    await engine.stop()


async def test_a_stream_the_pool_breaks_off_reaches_the_client_broken_and_the_next_request_is_served() -> (
    None
):
    engine = Engine(_free_port())
    await engine.start()

    async def no_wake() -> None:
        return None

    async with _probe_session() as session:
        probe = EngineProbe({"engine": lambda: [engine.url]}, lambda: session)
        activator = Activator("chat", engine.url, probe, no_wake, HoldLimits(max_wait=10.0))
        async with _serving(activator, _free_port()) as base:
            client = _client(base)
            with pytest.raises(openai.APIError):
                async for _chunk in await client.completions.create(model="m", prompt="hi", stream=True):
                    pass
            assert await _ask(client) == f"tokens from port-{engine.port}"
            assert (
                await _metric(base, "ampacity_activator_requests_total", {"outcome": "upstream-error"}) == 1
            )
            assert await _metric(base, "ampacity_activator_requests_total", {"outcome": "proxied"}) == 1
    await engine.stop()


def test_the_activator_command_says_what_is_wrong_with_an_engine_argument() -> None:
    from ampacity.cli import main

    with pytest.raises(SystemExit, match="expected PHASE=URL"):
        main(["activator", "--pool", "p", "--upstream", "http://127.0.0.1:9", "--engine", "decode"])
    with pytest.raises(SystemExit, match="at least one --engine"):
        main(["activator", "--pool", "p", "--upstream", "http://127.0.0.1:9"])
    with pytest.raises(SystemExit, match="give --upstream"):
        main(["activator", "--pool", "p", "--engine", "decode=http://127.0.0.1:9"])


async def test_a_wake_up_is_reported_once_its_held_requests_are_through() -> None:
    engine = Engine(_free_port())
    _, wake = _starting(engine, 0.5)
    episodes: list[Episode] = []

    async def report(episode: Episode) -> None:
        episodes.append(episode)

    async with _probe_session() as session:
        probe = EngineProbe({"engine": lambda: [engine.url]}, lambda: session)
        activator = Activator("chat", engine.url, probe, wake, HoldLimits(max_wait=20.0), report=report)
        async with _serving(activator, _free_port()) as base:
            client = _client(base)
            await asyncio.gather(*(_ask(client) for _ in range(5)))
            await _ask(client)  # the pool is up: held by no one, no new episode
            await asyncio.sleep(0)
    await engine.stop()
    assert len(episodes) == 1
    (episode,) = episodes
    # The engine only started 0.5 s after the first request asked for it.
    assert episode.held == 5 and episode.longest_wait >= 0.5
    assert episode.waited_total >= episode.longest_wait
