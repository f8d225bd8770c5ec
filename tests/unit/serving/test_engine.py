"""The vLLM-compatible engine in-process, through the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from ampacity.serving.engine import kv
from ampacity.serving.engine.server import Engine, EngineConfig

MODEL = "llama2-70b"
BASE = EngineConfig(
    model="meta-llama/Llama-2-70b-chat-hf",
    served_model_name=MODEL,
    latency_model=MODEL,
    gpu="h100",
    tensor_parallel_size=4,
    time_scale=0.01,
    side_channel_host="127.0.0.1",
)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    def __init__(self, engine: Engine, runner: web.AppRunner, port: int) -> None:
        self.engine, self.runner, self.port = engine, runner, port
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)


async def _start(config: EngineConfig) -> Running:
    engine = Engine(config)
    runner = web.AppRunner(engine.app())
    await runner.setup()
    port = _port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return Running(engine, runner, port)


@pytest.fixture
async def colocated() -> AsyncIterator[Running]:
    running = await _start(BASE)
    yield running
    await running.runner.cleanup()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Running, Running]]:
    prefill = await _start(
        replace(
            BASE,
            kv_transfer=kv.KVTransferConfig("NixlConnector", "kv_producer"),
            side_channel_port=_port(),
        )
    )
    decode = await _start(replace(BASE, kv_transfer=kv.KVTransferConfig("NixlConnector", "kv_consumer")))
    yield prefill, decode
    await decode.runner.cleanup()
    await prefill.runner.cleanup()


async def test_completion_shapes_and_usage(colocated: Running) -> None:
    reply = await colocated.client.completions.create(model=MODEL, prompt=list(range(100)), max_tokens=7)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        100,
        7,
        107,
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.model_extra is not None and reply.model_extra["kv_transfer_params"] is None

    stream = await colocated.client.completions.create(
        model=MODEL, prompt="a b c", max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None, None, None, "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens == 3


async def test_chat_stream_starts_with_the_assistant_role(colocated: Running) -> None:
    stream = await colocated.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=3, stream=True
    )
    chunks = [c async for c in stream]
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) != ""
    assert chunks[-1].choices[0].finish_reason == "length"
    reply = await colocated.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=3
    )
    assert reply.choices[0].message.role == "assistant" and reply.usage is not None
    assert reply.usage.completion_tokens == 3


async def test_unknown_model_and_bad_requests_are_client_errors(colocated: Running) -> None:
    with pytest.raises(openai.NotFoundError):
        await colocated.client.completions.create(model="other", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        await colocated.client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    models = await colocated.client.models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_max_model_len_refuses_what_does_not_fit_as_vllm_does() -> None:
    running = await _start(replace(BASE, max_model_len=128))
    try:
        reply = await running.client.completions.create(model=MODEL, prompt=list(range(100)), max_tokens=28)
        assert reply.usage is not None and reply.usage.total_tokens == 128
        with pytest.raises(openai.BadRequestError, match="maximum context length is 128 tokens"):
            await running.client.completions.create(model=MODEL, prompt=list(range(100)), max_tokens=29)
        with pytest.raises(openai.BadRequestError, match="your request has 128 input tokens"):
            await running.client.completions.create(model=MODEL, prompt=list(range(128)), max_tokens=1)
    finally:
        await running.runner.cleanup()


async def test_metrics_have_vllms_names_and_labels(colocated: Running) -> None:
    await colocated.client.completions.create(model=MODEL, prompt=list(range(50)), max_tokens=5)
    async with aiohttp.ClientSession() as session, session.get(colocated.url + "/metrics") as r:
        text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:request_success",
    ):
        assert name in families, name

    def value(family: str, sample: str, **labels: str) -> float:
        return next(
            s.value
            for s in families[family].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("vllm:prompt_tokens", "vllm:prompt_tokens_total", model_name=MODEL) == 50
    assert value("vllm:generation_tokens", "vllm:generation_tokens_total") == 5
    assert value("vllm:request_success", "vllm:request_success_total", finished_reason="length") == 1
    assert value("vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count") == 4


async def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(url + "/v1/completions", json=body) as r:
        return r.status, await r.json()


async def test_prefill_hands_its_kv_to_decode_once(pair: tuple[Running, Running]) -> None:
    prefill, decode = pair
    request = {"model": MODEL, "prompt": list(range(100)), "max_tokens": 8}
    status, first = await _post(
        prefill.url, {**request, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    )
    assert status == 200
    params = first["kv_transfer_params"]
    assert (
        params["do_remote_prefill"] is True
        and params["remote_port"] == prefill.engine.config.side_channel_port
    )
    assert len(params["remote_block_ids"]) == 100 // kv.BLOCK_SIZE
    assert prefill.engine.producer is not None and prefill.engine.producer.held

    status, done = await _post(decode.url, {**request, "kv_transfer_params": params})
    assert status == 200 and done["usage"]["completion_tokens"] == 8
    assert prefill.engine.producer.reads == [(params["remote_request_id"], len(params["remote_block_ids"]))]
    assert not prefill.engine.producer.held  # freed once read

    # The blocks were read and freed: a second decode with the same params has no KV to load.
    status, failed = await _post(decode.url, {**request, "kv_transfer_params": params})
    assert status == 500
    assert failed["error"] == {
        "message": "Internal server error",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }


async def test_decode_of_kv_no_prefill_produced_fails_like_vllm(pair: tuple[Running, Running]) -> None:
    prefill, decode = pair
    forged = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [1, 2, 3],
        "remote_engine_id": "not-an-engine",
        "remote_request_id": "cmpl-never",
        "remote_host": "127.0.0.1",
        "remote_port": prefill.engine.config.side_channel_port,
        "tp_size": 4,
    }
    with pytest.raises(openai.InternalServerError):
        await decode.client.completions.create(
            model=MODEL, prompt=list(range(64)), max_tokens=4, extra_body={"kv_transfer_params": forged}
        )
    # Under kv_load_failure_policy "recompute" the consumer prefills the prompt itself instead.
    recompute = await _start(
        replace(BASE, kv_transfer=kv.KVTransferConfig("NixlConnector", "kv_consumer", "recompute"))
    )
    try:
        reply = await recompute.client.completions.create(
            model=MODEL, prompt=list(range(64)), max_tokens=4, extra_body={"kv_transfer_params": forged}
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 4
    finally:
        await recompute.runner.cleanup()


# --- sleep mode (vLLM's /sleep, /wake_up, /is_sleeping) ---------------------------------------------


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name
    }


async def test_a_sleeping_engine_refuses_generation_and_reports_where_its_weights_are() -> None:
    running = await _start(replace(BASE, enable_sleep_mode=True, dev_mode=True))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(running.url + "/sleep?level=1") as r:
                assert r.status == 200
            async with session.get(running.url + "/is_sleeping") as r:
                assert await r.json() == {"is_sleeping": True}
            with pytest.raises(openai.InternalServerError, match="sleeping"):
                await running.client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            # /health and /v1/models still answer while asleep, as in vLLM.
            async with session.get(running.url + "/health") as r:
                assert r.status == 200
            async with session.get(running.url + "/metrics") as r:
                text = await r.text()
            state = _samples(text, "vllm:engine_sleep_state")
            assert [dict(k)["sleep_state"] for k, v in state.items() if v == 1] == ["weights_offloaded"]
            weights = {
                dict(k)["location"]: v for k, v in _samples(text, "ampacity_engine_weights_bytes").items()
            }
            assert weights["gpu"] == 0 and weights["host"] == running.engine.latency.spec.weight_bytes
            async with session.post(running.url + "/wake_up") as r:
                assert r.status == 200
            reply = await running.client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            assert reply.usage is not None and reply.usage.completion_tokens == 2
    finally:
        await running.runner.cleanup()


async def test_sleep_aborts_requests_in_flight_unless_asked_to_wait() -> None:
    running = await _start(replace(BASE, enable_sleep_mode=True, dev_mode=True, time_scale=0.05))
    try:
        async with aiohttp.ClientSession() as session:

            async def generate() -> int:
                reply = await running.client.completions.create(model=MODEL, prompt="x", max_tokens=200)
                assert reply.usage is not None
                return reply.usage.completion_tokens

            waited = asyncio.create_task(generate())
            await asyncio.sleep(0.2)
            async with session.post(running.url + "/sleep?level=2&mode=wait") as r:
                assert r.status == 200
            assert await waited == 200
            async with session.post(running.url + "/wake_up") as r:
                assert r.status == 200
            aborted = asyncio.create_task(generate())
            await asyncio.sleep(0.2)
            async with session.post(running.url + "/sleep?level=1") as r:
                assert r.status == 200
            assert await aborted < 200
    finally:
        await running.runner.cleanup()


async def test_without_sleep_mode_the_endpoints_fail_and_without_dev_mode_they_are_absent() -> None:
    plain = await _start(replace(BASE, dev_mode=True))
    hidden = await _start(replace(BASE, enable_sleep_mode=True))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(plain.url + "/sleep") as r:
                assert r.status == 500 and "--enable-sleep-mode" in (await r.json())["error"]
            async with session.get(plain.url + "/is_sleeping") as r:
                assert await r.json() == {"is_sleeping": False}
            async with session.post(hidden.url + "/sleep") as r:
                assert r.status == 404
    finally:
        await plain.runner.cleanup()
        await hidden.runner.cleanup()
