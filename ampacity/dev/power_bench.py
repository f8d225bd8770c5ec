"""`ampacity power bench-reaction`: how fast the operator answers a surge above T2.

A fresh local control plane with N kwok GPU nodes (8 H100 each), the CRDs and the operator
as a local process. Instead of N agent processes one process plays every agent, the way the
agent speaks (`agents.operator_link`, `agents.agent`):

- each emulated agent mints a token and publishes its hash in its NodePower status (one write);
- every second it POSTs its sample to the operator's power telemetry endpoint and takes the
  assignment in the answer, and it holds the assignment stream open, which pushes a changed
  assignment at once;
- it writes its NodePower status only where the agent's own report gate
  (`ampacity.power.reporting.ReportGate`, offloaded: deadband, 60 s heartbeat) says so.

1. all nodes report GPUs around 300 W with 25 W of noise (steady state); idle is far below T1;
2. surge: every node reports its GPUs flat out (110 % of the limit in total), concurrently;
3. the caps each emulated agent receives (answer or stream) are what it applies.

A watch on NodePowers counts the etcd writes per node: status writes (the agents') and spec
writes (the operator's, by generation), at steady state and during the surge.

The crossing is the answer to the surge report that takes the reported total above T2. The
reaction ends when the caps the agents have received keep the whole row under T2 even if every
GPU drew up to its limit (sum over GPUs of min(max limit, cap) <= T2): from then on the row is
safe whatever the agents report. Caps usually start before the crossing, since the reports
cross T1 first.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import secrets
import ssl
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from ampacity.dev.cluster.kubectl import Kubectl, install_crds
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.localcluster import LocalCluster
from ampacity.dev.cluster.polling import wait_for
from ampacity.power.reporting import ReportGate

GPUS = 8
MAX_WATTS, MIN_WATTS, IDLE_WATTS = 700.0, 200.0, 75.0
NODEPOWERS = "/apis/ampacity.dev/v1alpha1/nodepowers"
REPO = Path(__file__).resolve().parents[2]


#: Steady-state GPU power: a decode-heavy row around this mean, with per-sample noise (synthetic).
STEADY_WATTS, NOISE_WATTS = 300.0, 25.0
#: The budget's telemetry staleness: the default (agents and operator need no heartbeat writes).
STALENESS_SECONDS = 10.0


@dataclass(frozen=True)
class Trial:
    first_cap_s: float  # T2 crossing -> first caps received (negative: caps began at T1)
    safe_s: float  # T2 crossing -> received caps keep the whole row under T2 even at full draw
    surge_s: float  # first surge report sent -> last answered
    steady_agent_writes: float  # status writes per node per second at steady state
    steady_operator_writes: float  # spec writes per node per second at steady state
    surge_agent_writes: float  # the same over the surge window
    surge_operator_writes: float


def _uuid(node: str, index: int) -> str:
    return f"GPU-{zlib.crc32(node.encode()):08x}-0000-4000-8000-{index:012d}"


def _worst_case(caps: dict[int, float]) -> float:
    """A node's power if every GPU drew up to its assigned limit (uncapped GPUs at max)."""
    return float(sum(min(MAX_WATTS, caps.get(i, MAX_WATTS)) for i in range(GPUS)))


@dataclass
class _Row:
    """What the emulated agents hold: the caps each received, and when the received caps
    first appeared and first made the whole row safe at full draw."""

    t2: float
    worst: dict[str, float] = field(default_factory=dict)
    first_cap: float | None = None
    safe: float | None = None

    def received(self, node: str, caps: dict[int, float]) -> None:
        now = time.monotonic()
        if caps and self.first_cap is None:
            self.first_cap = now
        self.worst[node] = _worst_case(caps)
        if self.safe is None and sum(self.worst.values()) <= self.t2:
            self.safe = now


class _Node:
    """An emulated agent: samples, the fast way to the operator, the report gate for etcd."""

    def __init__(self, name: str, row: _Row) -> None:
        self.name = name
        self.row = row
        self.gate = ReportGate()
        self.caps: dict[int, float] = {}
        self.uuids = [_uuid(name, i) for i in range(GPUS)]
        self.token = secrets.token_urlsafe(32)
        self.token_hash = hashlib.sha256(self.token.encode()).hexdigest()
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def take(self, answer: dict[str, Any]) -> None:
        spec = answer.get("spec") or {}
        caps = {g["index"]: g["capWatts"] for g in spec.get("gpus", []) if g.get("capped")}
        if caps != self.caps or self.name not in self.row.worst:
            self.caps = caps
            self.row.received(self.name, caps)

    def status(self, watts: list[float]) -> dict[str, Any]:
        limits = [self.caps.get(i, MAX_WATTS) for i in range(GPUS)]
        drawn = [min(w, cap) for w, cap in zip(watts, limits, strict=True)]
        return {
            "sampledAt": datetime.now(UTC).isoformat(),
            "powerWatts": sum(drawn),
            "enforcing": True,
            "telemetryTokenHash": self.token_hash,
            "gpus": [
                {
                    "index": i,
                    "uuid": self.uuids[i],
                    "powerWatts": drawn[i],
                    "limitWatts": limits[i],
                    "minLimitWatts": MIN_WATTS,
                    "maxLimitWatts": MAX_WATTS,
                }
                for i in range(GPUS)
            ],
        }

    def is_news(self, status: dict[str, Any], offloaded: bool) -> bool:
        """The agent's gate: whether this sample is also worth a NodePower status write."""
        gpus = status["gpus"]
        return self.gate.is_news(
            time.time(),
            tuple(round(g["limitWatts"]) for g in gpus),
            {g["uuid"]: g["powerWatts"] for g in gpus},
            dict.fromkeys(self.uuids, MAX_WATTS),
            STALENESS_SECONDS,
            offloaded,
        )


@dataclass
class _Links:
    """The two ways out of the emulated agents: the API server (etcd) and the operator."""

    api: httpx.AsyncClient
    operator: aiohttp.ClientSession
    operator_url: str
    api_slots: asyncio.Semaphore
    operator_slots: asyncio.Semaphore


async def _write_status(links: _Links, node: _Node, status: dict[str, Any]) -> None:
    async with links.api_slots:
        response = await links.api.patch(
            f"{NODEPOWERS}/{node.name}/status",
            content=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        )
    if response.status_code >= 400:
        node.gate.failed()
        response.raise_for_status()


async def _sample(
    links: _Links, nodes: list[_Node], watts: float, rng: random.Random, noise: float = NOISE_WATTS
) -> list[float]:
    """One sample on every node: POSTed to the operator (answer -> caps), then written to the
    NodePower status where the gate allows. Returns the answers' times, in completion order."""
    answered: list[float] = []

    async def one(node: _Node) -> None:
        status = node.status([max(IDLE_WATTS, watts + rng.gauss(0.0, noise)) for _ in range(GPUS)])
        offloaded = False
        async with (
            links.operator_slots,
            links.operator.post(
                f"{links.operator_url}/v1/nodepowers/{node.name}/telemetry", json=status, headers=node.headers
            ) as response,
        ):
            if response.status == 200:
                node.take(await response.json())
                answered.append(time.monotonic())
                offloaded = True
        if node.is_news(status, offloaded):
            await _write_status(links, node, status)

    await asyncio.gather(*(one(n) for n in nodes))
    return sorted(answered)


async def _follow(links: _Links, node: _Node) -> None:
    """The agent's assignment stream: every pushed assignment is applied at once."""
    url = f"{links.operator_url}/v1/nodepowers/{node.name}/assignments"
    while True:
        try:
            timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
            async with links.operator.get(url, headers=node.headers, timeout=timeout) as response:
                async for line in response.content:
                    if line.strip():
                        node.take(json.loads(line))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass
        await asyncio.sleep(1.0)


async def _ticks(links: _Links, nodes: list[_Node], watts: float, seconds: float, rng: random.Random) -> None:
    """Sample every node once a second for `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        await _sample(links, nodes, watts, rng)
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


@dataclass
class _Writes:
    """NodePower writes seen by a watch: status (agents) and spec (operator, by generation)."""

    generations: dict[str, int]
    spec: int = 0
    status: int = 0


async def _count_writes(client: httpx.AsyncClient, budget: str, version: str, seen: _Writes) -> None:
    params = {"watch": "1", "resourceVersion": version}
    async with client.stream("GET", NODEPOWERS, params=params, timeout=None) as stream:
        async for line in stream.aiter_lines():
            event = json.loads(line)
            obj = event["object"]
            name = obj["metadata"]["name"]
            if obj.get("spec", {}).get("budget") != budget or event["type"] != "MODIFIED":
                continue
            generation = int(obj["metadata"].get("generation", 0))
            if seen.generations.get(name) != generation:
                seen.spec += 1
            else:
                seen.status += 1
            seen.generations[name] = generation


async def _until(check: Callable[[], bool], seconds: float, what: str, tick: Callable[[], Any]) -> None:
    """Run `tick` (a second of samples) until `check` holds, or fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {seconds:.0f} s")
        await tick()


async def _trial(
    links: _Links, kubectl: Kubectl, names: list[str], name: str, steady_seconds: float, surge_seconds: float
) -> Trial:
    limit_watts = len(names) * GPUS * MAX_WATTS / 1.1
    row = _Row(0.95 * limit_watts)
    budget = {
        "apiVersion": "ampacity.dev/v1alpha1",
        "kind": "PowerBudget",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"ampacity.dev/row": "row-a"}},
            "limitWatts": limit_watts,
            "safeCapWatts": 450,
            "telemetryStaleness": f"{STALENESS_SECONDS:.0f}s",
            "releaseHold": "10m",
        },
    }
    assert kubectl.apply(budget).returncode == 0
    nodes = [_Node(n, row) for n in names]
    rng = random.Random(name)
    setup = max(120.0, 0.5 * len(nodes))

    def owned() -> bool:
        items = kubectl.json("get", "nodepowers")["items"]
        return sum(1 for o in items if o["spec"].get("budget") == name) == len(nodes)

    started = time.monotonic()
    await asyncio.to_thread(wait_for, owned, setup, "NodePowers created")
    followers = [asyncio.create_task(_follow(links, n)) for n in nodes]
    try:

        def reporting() -> bool:
            obj = kubectl.get("powerbudget", name) or {}
            return bool(obj.get("status", {}).get("reportingNodes") == len(nodes))

        # The first sample's status write publishes each token's hash; samples go on (as agents'
        # do) until the operator answers every node the fast way and counts them all reporting.
        await _until(
            reporting, setup, "every node reporting", lambda: _ticks(links, nodes, STEADY_WATTS, 1.0, rng)
        )
        print(f"[bench] {name}: set-up {time.monotonic() - started:.0f} s", flush=True)
        listing = (await links.api.get(NODEPOWERS)).json()
        writes = _Writes(
            {o["metadata"]["name"]: int(o["metadata"].get("generation", 0)) for o in listing["items"]}
        )
        assert sum(row.worst.get(n.name, GPUS * MAX_WATTS) for n in nodes) > row.t2, "caps before the surge"
        watcher = asyncio.create_task(
            _count_writes(links.api, name, listing["metadata"]["resourceVersion"], writes)
        )
        await asyncio.sleep(1.0)  # the watch is open
        print(f"[bench] {name}: steady state for {steady_seconds:.0f} s", flush=True)
        await _ticks(links, nodes, STEADY_WATTS, steady_seconds, rng)
        steady = (writes.status, writes.spec)
        print(f"[bench] {name}: surge", flush=True)
        row.first_cap = row.safe = None
        surge_started = time.monotonic()
        answers = await _sample(links, nodes, MAX_WATTS, rng)
        base_total = len(nodes) * GPUS * STEADY_WATTS
        step = GPUS * (MAX_WATTS - STEADY_WATTS)
        crossing = next(t for k, t in enumerate(answers, 1) if base_total + k * step > row.t2)
        await _ticks(links, nodes, MAX_WATTS, surge_seconds, rng)
        surge = (writes.status - steady[0], writes.spec - steady[1])
        if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
            raise RuntimeError("the NodePower watch failed") from watcher.exception()
        watcher.cancel()
    finally:
        for task in followers:
            task.cancel()
    if row.safe is None or row.first_cap is None:
        raise RuntimeError(
            f"caps did not bring the row under T2 within {surge_seconds:.0f} s "
            f"({sum(row.worst.values()):.0f} W)"
        )
    kubectl("delete", "powerbudget", name)
    await asyncio.to_thread(
        wait_for, lambda: not kubectl.json("get", "nodepowers")["items"], 120, "NodePowers released"
    )
    per_node = float(len(nodes))
    return Trial(
        row.first_cap - crossing,
        max(0.0, row.safe - crossing),
        answers[-1] - surge_started,
        steady[0] / per_node / steady_seconds,
        steady[1] / per_node / steady_seconds,
        # The surge window: the surge reports plus the seconds of samples after them.
        surge[0] / per_node / (surge_seconds + 1),
        surge[1] / per_node / (surge_seconds + 1),
    )


async def _trials(
    cluster: LocalCluster,
    operator: LocalOperator,
    kubectl: Kubectl,
    nodes: int,
    trials: int,
    concurrency: int,
    steady_seconds: float,
    surge_seconds: float,
) -> list[Trial]:
    context = ssl.create_default_context(cafile=str(cluster.pki.ca.cert))
    context.load_cert_chain(str(cluster.pki.admin.cert), str(cluster.pki.admin.key))
    names = [f"gpu-node-{i}" for i in range(nodes)]
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    # One connection per agent stream plus the reports in flight, as N agents would hold.
    connector = aiohttp.TCPConnector(limit=nodes + concurrency + 8)
    async with (
        httpx.AsyncClient(base_url=cluster.server, verify=context, timeout=30, limits=limits) as api,
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session,
    ):
        links = _Links(
            api, session, operator.power_url, asyncio.Semaphore(concurrency), asyncio.Semaphore(concurrency)
        )
        return [
            await _trial(links, kubectl, names, f"bench-{i}", steady_seconds, surge_seconds)
            for i in range(trials)
        ]


def bench_reaction(
    nodes: int = 100,
    trials: int = 5,
    concurrency: int = 32,
    keep: Path | None = None,
    steady_seconds: float = 60.0,
    surge_seconds: float = 10.0,
) -> list[Trial]:
    """Run the benchmark on a fresh local control plane; returns one result per trial."""
    with tempfile.TemporaryDirectory(prefix="ampacity-bench-") as tmp:
        state = keep or Path(tmp)
        cluster = LocalCluster(state / "cluster", progress=lambda m: print(f"[cluster] {m}", flush=True))
        started = time.monotonic()
        cluster.up(nodes=nodes)
        print(f"[bench] cluster with {nodes} nodes up in {time.monotonic() - started:.0f} s", flush=True)
        operator = LocalOperator(cluster.kubeconfig, state / "operator.log")
        try:
            kubectl = Kubectl(cluster.kubeconfig)
            install_crds(kubectl, REPO / "crds")
            operator.start()
            return asyncio.run(
                _trials(cluster, operator, kubectl, nodes, trials, concurrency, steady_seconds, surge_seconds)
            )
        finally:
            operator.stop()
            cluster.down()


def summarize(trials: list[Trial], nodes: int) -> str:
    lines = [f"reaction to a surge above T2, {nodes} kwok nodes x {GPUS} GPUs, {len(trials)} trials:"]
    for i, t in enumerate(trials):
        lines.append(
            f"  trial {i}: first caps {t.first_cap_s * 1000:+.0f} ms, row safe under T2 "
            f"{t.safe_s * 1000:.0f} ms after the crossing "
            f"(the {nodes} surge reports were answered in {t.surge_s * 1000:.0f} ms)"
        )
    for i, t in enumerate(trials):
        lines.append(
            f"  trial {i}: writes per node per second: steady {t.steady_agent_writes:.3f} status + "
            f"{t.steady_operator_writes:.3f} spec, surge {t.surge_agent_writes:.3f} status + "
            f"{t.surge_operator_writes:.3f} spec"
        )
    safe = [t.safe_s for t in trials]
    lines.append(
        f"crossing T2 -> caps keep the row under T2: median {statistics.median(safe) * 1000:.0f} ms, "
        f"max {max(safe) * 1000:.0f} ms"
    )
    steady = [t.steady_agent_writes + t.steady_operator_writes for t in trials]
    lines.append(
        f"steady-state writes per node per second (status + spec): median {statistics.median(steady):.3f}"
    )
    return "\n".join(lines)
