"""vLLM's sleep endpoints on an aiohttp app, their state machine and metrics, and the activator
waking a sleeping engine through them."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ampacity.serving import sleepmode
from ampacity.serving.activator import Activator, EngineProbe, HoldLimits, wake_engines
from ampacity.serving.sleepmode import SleepMode

GB = 1e9


async def _no_pause(_seconds: float) -> None:
    return None


def _mode(registry: CollectorRegistry) -> SleepMode:
    return SleepMode(24 * GB, 40 * GB, registry, "flux", pause=_no_pause)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _state(registry: CollectorRegistry) -> str:
    found = [
        dict(labels)["sleep_state"]
        for (name, labels), value in _samples(registry).items()
        if name == "vllm:engine_sleep_state" and value == 1.0
    ]
    assert len(found) == 1
    return found[0]


def _weights(registry: CollectorRegistry, location: str) -> float:
    return _samples(registry)[
        ("ampacity_engine_weights_bytes", (("location", location), ("model_name", "flux")))
    ]


async def test_level_1_moves_the_weights_to_host_memory_and_level_2_drops_them() -> None:
    registry = CollectorRegistry()
    mode = _mode(registry)
    assert _state(registry) == sleepmode.AWAKE and _weights(registry, "gpu") == 24 * GB
    await mode.sleep(1)
    assert mode.is_sleeping and _state(registry) == sleepmode.WEIGHTS_OFFLOADED
    assert (_weights(registry, "gpu"), _weights(registry, "host")) == (0.0, 24 * GB)
    assert _samples(registry)[("ampacity_engine_kv_cache_bytes", (("model_name", "flux"),))] == 0.0
    await mode.wake_up()
    assert not mode.is_sleeping and mode.wakes == 1 and _state(registry) == sleepmode.AWAKE
    await mode.sleep(2)
    assert _state(registry) == sleepmode.DISCARD_ALL
    assert (_weights(registry, "gpu"), _weights(registry, "host")) == (0.0, 0.0)


async def test_a_partial_wake_leaves_the_engine_sleeping_until_both_tags_are_back() -> None:
    mode = _mode(CollectorRegistry())
    await mode.sleep(1)
    await mode.wake_up(["weights"])
    assert mode.is_sleeping and mode.asleep_tags == {"kv_cache"}
    assert mode.refusal() is not None
    await mode.wake_up(["kv_cache"])
    assert not mode.is_sleeping and mode.refusal() is None
    with pytest.raises(sleepmode.SleepModeError, match="unknown wake-up tags"):
        await mode.wake_up(["lora"])
    with pytest.raises(sleepmode.SleepModeError, match="sleep level must be 1 or 2"):
        await mode.sleep(3)


async def test_wake_time_follows_the_level() -> None:
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    mode = SleepMode(24 * GB, 40 * GB, CollectorRegistry(), "flux", pause=pause)
    await mode.sleep(1)
    await mode.wake_up()
    await mode.sleep(2)
    await mode.wake_up()
    # Sleep 1 copies out (~1 s at 25 GB/s), its wake ~2 s; sleep 2 frees at once, its wake reloads.
    assert pauses[0] == pytest.approx(0.96) and pauses[1] == pytest.approx(2.07, abs=0.01)
    assert pauses[2] == 0.0 and pauses[3] == pytest.approx(6.42, abs=0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _engine_app(mode: SleepMode) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        refused = mode.refusal()
        if refused is not None:
            return refused
        return web.json_response({"served": True})

    async def health(_request: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application()
    sleepmode.add_routes(app, mode)
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    return app


@asynccontextmanager
async def _run(app: web.Application, port: int) -> AsyncIterator[str]:
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_the_endpoints_speak_vllms_protocol_and_the_activator_wakes_through_them() -> None:
    mode = _mode(CollectorRegistry())
    async with _run(await _engine_app(mode), _free_port()) as url, aiohttp.ClientSession() as session:
        async with session.post(f"{url}/sleep?level=1") as r:
            assert r.status == 200 and await r.read() == b""
        async with session.get(f"{url}/is_sleeping") as r:
            assert await r.json() == {"is_sleeping": True}
        async with session.post(f"{url}/v1/chat/completions", json={}) as r:
            assert r.status == 503 and "sleeping" in (await r.json())["error"]["message"]
        async with session.post(f"{url}/sleep?level=7") as r:
            assert r.status == 400
        probe = EngineProbe({"engine": lambda: [url]}, lambda: session)
        assert not await probe()
        activator = Activator("flux", url, probe, wake_engines(probe), HoldLimits(max_wait=10.0))
        async with (
            _run(activator.app(), _free_port()) as base,
            session.post(f"{base}/v1/chat/completions", json={}) as r,
        ):
            assert r.status == 200 and await r.json() == {"served": True}
        assert mode.wakes == 1 and not mode.is_sleeping
