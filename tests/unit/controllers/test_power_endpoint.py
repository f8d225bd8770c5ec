"""The fast way: node agents (the real `Agent` and `OperatorLink`) against the operator's real power
telemetry endpoint, runtime and read cache, over HTTP on a local port, with the in-memory API server.

An agent publishes its token's hash in its NodePower status, then reports the fast way; a surge it
reports is capped and the caps are pushed down its assignment stream without the agent reading its
NodePower; the operator refreshes no spec while the agent hears it; a wrong token, an unknown node
and a bad report are refused in words; an agent whose endpoint is gone keeps to the API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import kopf
import pytest
from aiohttp.test_utils import TestServer

from agents.agent import Agent
from agents.gpu import SimulatedGpuBackend
from agents.operator_link import OperatorLink
from ampacity.api import POWER_BUDGET
from controllers.cache import ClusterCache
from controllers.powerbudget import endpoint
from controllers.powerbudget.controller import POWER_MEMO, reconcile
from controllers.powerbudget.runtime import PowerRuntime
from controllers.reconciler import CACHE_MEMO, Context, _reconcile_once
from tests.fakes import FakeKube
from tests.unit.controllers.test_powerbudget_reconcile import add_budget

NODES = ("n0", "n1")


def budget_row() -> FakeKube:
    """Two nodes of 2 GPUs under one PowerBudget, in the in-memory API server."""
    kube = FakeKube()
    for name in NODES:
        kube.add(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "uid": f"uid-{name}", "labels": {"ampacity.dev/row": "a"}},
                "status": {"capacity": {"nvidia.com/gpu": "2"}},
            }
        )
    # 4 GPUs of 700 W: 2,800 W flat out, T2 at 2,280 W.
    add_budget(kube, telemetryStaleness="3s")
    return kube


@pytest.fixture
async def operator() -> AsyncIterator[tuple[FakeKube, dict[str, Any], str]]:
    kube = budget_row()
    cache = ClusterCache(kube)
    await cache.start(sync_seconds=5)
    power = PowerRuntime(kube, cache.node_power_informer)
    server = TestServer(endpoint.make_app(power))
    await server.start_server()
    try:
        yield kube, {CACHE_MEMO: cache, POWER_MEMO: power}, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()
        await power.close()
        await cache.close()


async def until(check: Callable[[], bool], what: str, step: Callable[[], Any] | None = None) -> None:
    for _ in range(250):
        if check():
            return
        if step is not None:
            await step()
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def run(kube: FakeKube, memo: dict[str, Any]) -> Context:
    body = kopf.Body(kube.stored("PowerBudget", None, "row") or {})
    return await _reconcile_once(POWER_BUDGET, reconcile, body, kube, logging.getLogger("test"), memo)


def agents(kube: FakeKube, url: str, load: float) -> dict[str, Agent]:
    made = {}
    for node in NODES:
        backend = SimulatedGpuBackend(2, clock=lambda: 0.0)
        for i in range(2):
            backend.set_load(i, prompt_busy=load)
        made[node] = Agent(node, backend, kube, link=OperatorLink(url, node))
    return made


def capped(agent: Agent) -> bool:
    latest = agent.link.latest if agent.link is not None else None
    return latest is not None and latest.spec is not None and any(g.capped for g in latest.spec.gpus)


async def test_a_surge_reported_the_fast_way_is_capped_and_pushed_without_reading_the_nodepower(
    operator: tuple[FakeKube, dict[str, Any], str],
) -> None:
    kube, memo, url = operator
    await run(kube, memo)
    await until(lambda: len(kube.of_kind("NodePower")) == 2, "NodePowers written")
    fleet = agents(kube, url, load=0.1)
    power: PowerRuntime = memo[POWER_MEMO]

    # First rounds: the status carries the token's hash; once the cache has it, reports go through.
    async def step_all() -> None:
        for agent in fleet.values():
            await agent.step()

    def answered() -> bool:
        return all(a.link is not None and a.link.latest is not None for a in fleet.values())

    await until(answered, "fast answers", step_all)
    for node, agent in fleet.items():
        assert agent.link is not None
        status = kube.stored("NodePower", None, node)["status"]  # type: ignore[index]
        assert status["telemetryTokenHash"] == agent.link.token_hash
    stop = asyncio.Event()
    streams = [
        asyncio.create_task(a.link.follow(a.wake.set, stop)) for a in fleet.values() if a.link is not None
    ]
    try:
        # Flat out: 2 x 2 x 700 W is above T2. The reports alone trigger the round (no reconcile);
        # the caps reach the agents on their streams and in the answers, not through a GET.
        for agent in fleet.values():
            assert isinstance(agent.backend, SimulatedGpuBackend)
            for i in range(2):
                agent.backend.set_load(i, prompt_busy=1.0)
        gets = kube.count("get", "NodePower")
        await step_all()
        await until(lambda: all(capped(a) for a in fleet.values()), "caps pushed to every agent")
        assert all(a.wake.is_set() for a in fleet.values())
        results = [await a.step() for a in fleet.values()]
        assert kube.count("get", "NodePower") == gets
        assert all(not r.failsafe and min(r.limits) < 700 for r in results)
        assert all(a.metrics.fast_reports >= 2 for a in fleet.values())
        assert power.status_of("n0").power_watts > 0

        # While the agents hear the operator the fast way, no spec is rewritten just to refresh
        # assignedAt (staleness 3 s: the slow way's heartbeat, every 1 s, would have rewritten it).
        specs = {o["metadata"]["name"]: o["spec"]["assignedAt"] for o in kube.of_kind("NodePower")}
        for _ in range(5):  # at least 1.5 s: past the slow way's 1 s heartbeat
            await step_all()
            await asyncio.sleep(0.3)
            await power.run_rounds(power.budgets["row"])
        assert {o["metadata"]["name"]: o["spec"]["assignedAt"] for o in kube.of_kind("NodePower")} == specs
        for agent in fleet.values():
            assert not (await agent.step()).failsafe
    finally:
        stop.set()
        for task in streams:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for agent in fleet.values():
            if agent.link is not None:
                await agent.link.close()


async def test_the_endpoint_refuses_in_words(operator: tuple[FakeKube, dict[str, Any], str]) -> None:
    kube, memo, url = operator
    await run(kube, memo)
    await until(lambda: len(kube.of_kind("NodePower")) == 2, "NodePowers written")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/nodepowers/nowhere/telemetry", json={}) as response:
            assert response.status == 404
            assert "under no PowerBudget" in (await response.json())["error"]
        async with http.post(f"{url}/v1/nodepowers/n0/telemetry", json={}) as response:
            assert response.status == 401
        await kube.patch_status("NodePower", None, "n0", {"telemetryTokenHash": "0" * 64})
        await until(
            lambda: (
                memo[POWER_MEMO].authorized("n0", "") is False
                and memo[POWER_MEMO].node_powers["n0"].get("status", {}).get("telemetryTokenHash")
            ),
            "hash in the cache",
        )
        headers = {"Authorization": "Bearer not-the-token"}
        async with http.get(f"{url}/v1/nodepowers/n0/assignments", headers=headers) as response:
            assert response.status == 401
            assert "not the one published" in (await response.json())["error"]
        link = OperatorLink(url, "n0")
        await kube.patch_status("NodePower", None, "n0", {"telemetryTokenHash": link.token_hash})
        await until(lambda: memo[POWER_MEMO].authorized("n0", link.token), "new hash in the cache")
        headers = {"Authorization": f"Bearer {link.token}"}
        async with http.post(
            f"{url}/v1/nodepowers/n0/telemetry", json={"gpus": [{"index": -1}]}, headers=headers
        ) as response:
            assert response.status == 400
            assert "not a NodePower status" in (await response.json())["error"]
        await link.close()


async def test_an_agent_whose_endpoint_is_gone_keeps_to_the_api_server(
    operator: tuple[FakeKube, dict[str, Any], str],
) -> None:
    kube, memo, _ = operator
    await run(kube, memo)
    await until(lambda: len(kube.of_kind("NodePower")) == 2, "NodePowers written")
    agent = agents(kube, "http://127.0.0.1:9", load=0.1)["n0"]  # nothing listens on port 9
    await until(
        lambda: bool((kube.stored("NodePower", None, "n0") or {}).get("status", {}).get("sampledAt")),
        "a status written the slow way",
        agent.step,
    )
    gets = kube.count("get", "NodePower")
    result = await agent.step()
    assert kube.count("get", "NodePower") == gets + 1  # the assignment came from the API server
    assert agent.link is not None and agent.link.latest is None and result.under_budget
    await agent.link.close()
