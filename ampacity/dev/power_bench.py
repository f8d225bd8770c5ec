"""`ampacity power bench-reaction`: how fast the operator answers a surge above T2.

A fresh local control plane with N kwok GPU nodes (8 H100 each), the CRDs and the operator
as a local process. Instead of N agent processes the benchmark writes the NodePower status
reports itself (what N agents would write), as fast as the API server takes them:

1. all nodes report idle GPUs; the budget's limit puts idle far below T1;
2. surge: every node reports its GPUs flat out (110 % of the limit in total), concurrently;
3. a watch on NodePowers follows the caps the operator writes.

Each node's reports go through the node agent's own report gate (`ampacity.power.reporting.ReportGate`:
deadband and heartbeat), so the benchmark also measures the write rate per node: at steady
state (GPU power around a mean with per-sample noise, one sample per second per node) and
during the surge (reports, the operator's caps, and the reports acknowledging them). The
emulated agents do not poll their NodePower (a real agent reads it once per round: a GET,
not an etcd write).

The crossing is the acknowledgement of the surge report that takes the reported total above
T2. The reaction ends when the caps written so far keep the whole row under T2 even if every
GPU drew up to its limit (sum over GPUs of min(max limit, cap) <= T2): from then on the row
is safe whatever the agents report. Caps usually start before the crossing, since the
reports cross T1 first.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import statistics
import tempfile
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
STALENESS_SECONDS = 30.0


@dataclass(frozen=True)
class Trial:
    first_cap_s: float  # T2 crossing -> first caps written (negative: caps began at T1)
    safe_s: float  # T2 crossing -> written caps keep the whole row under T2 even at full draw
    surge_s: float  # first surge write sent -> last acknowledged
    steady_agent_writes: float  # status writes per node per second at steady state
    steady_operator_writes: float  # spec writes per node per second at steady state
    surge_agent_writes: float  # the same over the surge window
    surge_operator_writes: float


def _uuid(node: str, index: int) -> str:
    return f"GPU-{zlib.crc32(node.encode()):08x}-0000-4000-8000-{index:012d}"


class _Node:
    """An emulated agent: GPU power samples through the agent's own report gate."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.gate = ReportGate()
        self.caps: dict[int, float] = {}
        self.uuids = [_uuid(name, i) for i in range(GPUS)]

    def status(self, watts: list[float]) -> dict[str, Any] | None:
        """The status patch for this sample, or None when the gate says it is no news."""
        limits = [self.caps.get(i, MAX_WATTS) for i in range(GPUS)]
        drawn = [min(w, cap) for w, cap in zip(watts, limits, strict=True)]
        key = tuple(round(x) for x in limits)
        power = dict(zip(self.uuids, drawn, strict=True))
        if not self.gate.is_news(
            time.time(), key, power, dict.fromkeys(self.uuids, MAX_WATTS), STALENESS_SECONDS
        ):
            return None
        return {
            "status": {
                "sampledAt": datetime.now(UTC).isoformat(),
                "powerWatts": sum(drawn),
                "enforcing": True,
                "gpus": [
                    {
                        "index": i,
                        "uuid": self.uuids[i],
                        "powerWatts": drawn[i],
                        "energyJoules": 0,
                        "limitWatts": limits[i],
                        "minLimitWatts": MIN_WATTS,
                        "maxLimitWatts": MAX_WATTS,
                    }
                    for i in range(GPUS)
                ],
            }
        }


async def _report(
    client: httpx.AsyncClient,
    nodes: list[_Node],
    watts: float,
    limit: asyncio.Semaphore,
    noise: float = 0.0,
    rng: random.Random | None = None,
) -> list[float]:
    """One sample on every node, written where the gate allows; return each write's
    acknowledgement time, in completion order."""
    done: list[float] = []
    rng = rng or random.Random(0)

    async def one(node: _Node) -> None:
        patch = node.status([max(IDLE_WATTS, watts + rng.gauss(0.0, noise)) for _ in range(GPUS)])
        if patch is None:
            return
        async with limit:
            response = await client.patch(
                f"{NODEPOWERS}/{node.name}/status",
                content=json.dumps(patch),
                headers={"Content-Type": "application/merge-patch+json"},
            )
            if response.status_code >= 400:
                node.gate.failed()
            response.raise_for_status()
            done.append(time.monotonic())

    await asyncio.gather(*(one(n) for n in nodes))
    return sorted(done)


async def _ticks(
    client: httpx.AsyncClient,
    nodes: list[_Node],
    watts: float,
    limit: asyncio.Semaphore,
    seconds: float,
    rng: random.Random,
) -> int:
    """Sample every node once a second for `seconds`; return the status writes made."""
    writes = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        writes += len(await _report(client, nodes, watts, limit, NOISE_WATTS, rng))
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    return writes


def _worst_case_watts(spec: dict[str, Any]) -> float:
    """A node's power if every GPU drew up to its assigned limit (uncapped GPUs at max)."""
    caps = {g["index"]: min(MAX_WATTS, g["capWatts"]) for g in spec.get("gpus", [])}
    return float(sum(caps.get(i, MAX_WATTS) for i in range(GPUS)))


@dataclass
class _Watched:
    """What the watch saw: when caps first appeared, when the assigned caps first made the
    whole row safe at full draw (sum over GPUs of min(max, cap) <= T2), and the writes."""

    worst: dict[str, float]
    nodes: dict[str, _Node]
    t2: float
    first_cap: float | None = None
    safe: float | None = None
    generations: dict[str, int] | None = None
    spec_writes: int = 0
    status_writes: int = 0


async def _watch_caps(client: httpx.AsyncClient, budget: str, version: str, seen: _Watched) -> None:
    """Follow NodePowers: hand the caps to the emulated agents, count spec and status writes."""
    params = {"watch": "1", "resourceVersion": version}
    generations = seen.generations if seen.generations is not None else {}
    async with client.stream("GET", NODEPOWERS, params=params, timeout=None) as stream:
        async for line in stream.aiter_lines():
            event = json.loads(line)
            obj = event["object"]
            spec = obj.get("spec", {})
            name = obj["metadata"]["name"]
            if spec.get("budget") != budget or event["type"] != "MODIFIED":
                continue
            generation = int(obj["metadata"].get("generation", 0))
            if generations.get(name) != generation:
                seen.spec_writes += 1
            else:
                seen.status_writes += 1
            generations[name] = generation
            node = seen.nodes.get(name)
            if node is not None:
                node.caps = {g["index"]: g["capWatts"] for g in spec.get("gpus", []) if g.get("capped")}
            now = time.monotonic()
            if seen.first_cap is None and any(g.get("capped") for g in spec.get("gpus", [])):
                seen.first_cap = now
            seen.worst[name] = _worst_case_watts(spec)
            if seen.safe is None and sum(seen.worst.values()) <= seen.t2:
                seen.safe = now


async def _trial(
    client: httpx.AsyncClient,
    kubectl: Kubectl,
    names: list[str],
    name: str,
    concurrency: int,
    steady_seconds: float,
    surge_seconds: float,
) -> Trial:
    limit_watts = len(names) * GPUS * MAX_WATTS / 1.1
    t2 = 0.95 * limit_watts
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
    semaphore = asyncio.Semaphore(concurrency)
    nodes = [_Node(n) for n in names]
    rng = random.Random(name)

    def owned() -> bool:
        items = kubectl.json("get", "nodepowers")["items"]
        return sum(1 for o in items if o["spec"].get("budget") == name) == len(nodes)

    await asyncio.to_thread(wait_for, owned, max(120.0, 0.5 * len(nodes)), "NodePowers created")
    await _report(client, nodes, STEADY_WATTS, semaphore)

    def reporting() -> bool:
        obj = kubectl.get("powerbudget", name) or {}
        return bool(obj.get("status", {}).get("reportingNodes") == len(nodes))

    # Keep sampling (through the gate: heartbeats) while waiting, or on a slow API server the
    # first reports go stale before the last ones land.
    deadline = time.monotonic() + max(60.0, 0.5 * len(nodes))
    while not await asyncio.to_thread(reporting):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every node reporting after {max(60.0, 0.5 * len(nodes)):.0f} s")
        await _ticks(client, nodes, STEADY_WATTS, semaphore, 3.0, rng)
    listing = (await client.get(NODEPOWERS)).json()
    seen = _Watched(
        {o["metadata"]["name"]: _worst_case_watts(o["spec"]) for o in listing["items"]},
        {n.name: n for n in nodes},
        t2,
        generations={
            o["metadata"]["name"]: int(o["metadata"].get("generation", 0)) for o in listing["items"]
        },
    )
    assert sum(seen.worst.values()) > t2, "caps before the surge"
    version = listing["metadata"]["resourceVersion"]
    watcher = asyncio.create_task(_watch_caps(client, name, version, seen))
    await asyncio.sleep(1.0)  # the watch is open
    print(f"[bench] {name}: steady state for {steady_seconds:.0f} s", flush=True)
    await _ticks(client, nodes, STEADY_WATTS, semaphore, steady_seconds, rng)
    steady = (seen.status_writes, seen.spec_writes)
    print(f"[bench] {name}: surge", flush=True)
    started = time.monotonic()
    acks = await _report(client, nodes, MAX_WATTS, semaphore, NOISE_WATTS, rng)
    base_total = len(nodes) * GPUS * STEADY_WATTS
    step = GPUS * (MAX_WATTS - STEADY_WATTS)
    crossing = next(t for k, t in enumerate(acks, 1) if base_total + k * step > t2)
    await _ticks(client, nodes, MAX_WATTS, semaphore, surge_seconds, rng)
    surge = (seen.status_writes - steady[0], seen.spec_writes - steady[1])
    if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
        raise RuntimeError("the NodePower watch failed") from watcher.exception()
    watcher.cancel()
    if seen.safe is None or seen.first_cap is None:
        raise RuntimeError(
            f"caps did not bring the row under T2 within {surge_seconds:.0f} s "
            f"({sum(seen.worst.values()):.0f} W)"
        )
    kubectl("delete", "powerbudget", name)
    await asyncio.to_thread(
        wait_for, lambda: not kubectl.json("get", "nodepowers")["items"], 60, "NodePowers released"
    )
    per_node = float(len(nodes))
    return Trial(
        seen.first_cap - crossing,
        max(0.0, seen.safe - crossing),
        acks[-1] - started,
        steady[0] / per_node / steady_seconds,
        steady[1] / per_node / steady_seconds,
        # The surge window: the surge reports plus the seconds of samples after them.
        surge[0] / per_node / (surge_seconds + 1),
        surge[1] / per_node / (surge_seconds + 1),
    )


async def _trials(
    cluster: LocalCluster,
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
    async with httpx.AsyncClient(
        base_url=cluster.server, verify=context, timeout=30, limits=limits
    ) as client:
        return [
            await _trial(client, kubectl, names, f"bench-{i}", concurrency, steady_seconds, surge_seconds)
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
        cluster.up(nodes=nodes)
        operator = LocalOperator(cluster.kubeconfig, state / "operator.log")
        try:
            kubectl = Kubectl(cluster.kubeconfig)
            install_crds(kubectl, REPO / "crds")
            operator.start()
            return asyncio.run(
                _trials(cluster, kubectl, nodes, trials, concurrency, steady_seconds, surge_seconds)
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
            f"(the {nodes} surge reports took {t.surge_s * 1000:.0f} ms)"
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
