"""`ampacity power bench-reaction`: how fast the operator answers a surge above T2.

A fresh local control plane with N kwok GPU nodes (8 H100 each), the CRDs and the operator
as a local process. Instead of N agent processes the benchmark writes the NodePower status
reports itself (what N agents would write), as fast as the API server takes them:

1. all nodes report idle GPUs; the budget's limit puts idle far below T1;
2. surge: every node reports its GPUs flat out (110 % of the limit in total), concurrently;
3. a watch on NodePowers follows the caps the operator writes.

The crossing is the acknowledgement of the surge report that takes the reported total above
T2. The reaction ends when the caps written so far keep the whole row under T2 even if every
GPU drew up to its limit (sum over GPUs of min(max limit, cap) <= T2): from then on the row
is safe whatever the agents report. Caps usually start before the crossing, since the
reports cross T1 first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from ampacity.dev.cluster.kubectl import Kubectl, install_crds
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.localcluster import LocalCluster
from ampacity.dev.cluster.polling import wait_for

GPUS = 8
MAX_WATTS, MIN_WATTS, IDLE_WATTS = 700.0, 200.0, 75.0
NODEPOWERS = "/apis/ampacity.dev/v1alpha1/nodepowers"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Trial:
    first_cap_s: float  # T2 crossing -> first caps written (negative: caps began at T1)
    safe_s: float  # T2 crossing -> written caps keep the whole row under T2 even at full draw
    surge_s: float  # first surge write sent -> last acknowledged


def _status(watts: float) -> dict[str, Any]:
    return {
        "status": {
            "sampledAt": datetime.now(UTC).isoformat(),
            "powerWatts": watts * GPUS,
            "gpus": [
                {
                    "index": i,
                    "powerWatts": watts,
                    "energyJoules": 0,
                    "limitWatts": MAX_WATTS,
                    "minLimitWatts": MIN_WATTS,
                    "maxLimitWatts": MAX_WATTS,
                }
                for i in range(GPUS)
            ],
        }
    }


async def _report(
    client: httpx.AsyncClient, nodes: list[str], watts: float, limit: asyncio.Semaphore
) -> list[float]:
    """Write every node's status; return each write's acknowledgement time, in completion order."""
    done: list[float] = []

    async def one(node: str) -> None:
        async with limit:
            response = await client.patch(
                f"{NODEPOWERS}/{node}/status",
                content=json.dumps(_status(watts)),
                headers={"Content-Type": "application/merge-patch+json"},
            )
            response.raise_for_status()
            done.append(time.monotonic())

    await asyncio.gather(*(one(n) for n in nodes))
    return sorted(done)


def _worst_case_watts(spec: dict[str, Any]) -> float:
    """A node's power if every GPU drew up to its assigned limit (uncapped GPUs at max)."""
    caps = {g["index"]: min(MAX_WATTS, g["capWatts"]) for g in spec.get("gpus", [])}
    return float(sum(caps.get(i, MAX_WATTS) for i in range(GPUS)))


@dataclass
class _Watched:
    """What the watch saw: when caps first appeared, and when the assigned caps first made the
    whole row safe at full draw (sum over GPUs of min(max, cap) <= T2)."""

    worst: dict[str, float]
    first_cap: float | None = None
    safe: float | None = None


async def _watch_caps(
    client: httpx.AsyncClient, budget: str, version: str, t2: float, seen: _Watched, done: asyncio.Event
) -> None:
    params = {"watch": "1", "resourceVersion": version}
    async with client.stream("GET", NODEPOWERS, params=params, timeout=None) as stream:
        async for line in stream.aiter_lines():
            obj = json.loads(line)["object"]
            spec = obj.get("spec", {})
            if spec.get("budget") != budget:
                continue
            now = time.monotonic()
            if seen.first_cap is None and any(g.get("capped") for g in spec.get("gpus", [])):
                seen.first_cap = now
            seen.worst[obj["metadata"]["name"]] = _worst_case_watts(spec)
            if sum(seen.worst.values()) <= t2:
                seen.safe = now
                done.set()
                return


async def _trial(
    client: httpx.AsyncClient, kubectl: Kubectl, nodes: list[str], name: str, concurrency: int
) -> Trial:
    limit_watts = len(nodes) * GPUS * MAX_WATTS / 1.1
    t2 = 0.95 * limit_watts
    budget = {
        "apiVersion": "ampacity.dev/v1alpha1",
        "kind": "PowerBudget",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"ampacity.dev/row": "row-a"}},
            "limitWatts": limit_watts,
            "safeCapWatts": 450,
            "telemetryStaleness": "30s",
            "releaseHold": "10m",
        },
    }
    assert kubectl.apply(budget).returncode == 0
    semaphore = asyncio.Semaphore(concurrency)

    def owned() -> bool:
        items = kubectl.json("get", "nodepowers")["items"]
        return sum(1 for o in items if o["spec"].get("budget") == name) == len(nodes)

    await asyncio.to_thread(wait_for, owned, 120, "NodePowers created")
    await _report(client, nodes, IDLE_WATTS, semaphore)

    def reporting() -> bool:
        obj = kubectl.get("powerbudget", name) or {}
        return bool(obj.get("status", {}).get("reportingNodes") == len(nodes))

    await asyncio.to_thread(wait_for, reporting, 60, "every node reporting")
    listing = (await client.get(NODEPOWERS)).json()
    seen = _Watched({o["metadata"]["name"]: _worst_case_watts(o["spec"]) for o in listing["items"]})
    assert sum(seen.worst.values()) > t2, "caps before the surge"
    done = asyncio.Event()
    version = listing["metadata"]["resourceVersion"]
    watcher = asyncio.create_task(_watch_caps(client, name, version, t2, seen, done))
    await asyncio.sleep(1.0)  # the watch is open
    started = time.monotonic()
    acks = await _report(client, nodes, MAX_WATTS, semaphore)
    idle_total = len(nodes) * GPUS * IDLE_WATTS
    step = GPUS * (MAX_WATTS - IDLE_WATTS)
    crossing = next(t for k, t in enumerate(acks, 1) if idle_total + k * step > t2)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), 30)
    if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
        raise RuntimeError("the NodePower watch failed") from watcher.exception()
    watcher.cancel()
    if seen.safe is None or seen.first_cap is None:
        raise RuntimeError(
            f"caps did not bring the row under T2 within 30 s ({sum(seen.worst.values()):.0f} W)"
        )
    kubectl("delete", "powerbudget", name)
    await asyncio.to_thread(
        wait_for, lambda: not kubectl.json("get", "nodepowers")["items"], 60, "NodePowers released"
    )
    return Trial(seen.first_cap - crossing, max(0.0, seen.safe - crossing), acks[-1] - started)


async def _trials(
    cluster: LocalCluster, kubectl: Kubectl, nodes: int, trials: int, concurrency: int
) -> list[Trial]:
    context = ssl.create_default_context(cafile=str(cluster.pki.ca.cert))
    context.load_cert_chain(str(cluster.pki.admin.cert), str(cluster.pki.admin.key))
    names = [f"gpu-node-{i}" for i in range(nodes)]
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(
        base_url=cluster.server, verify=context, timeout=30, limits=limits
    ) as client:
        return [await _trial(client, kubectl, names, f"bench-{i}", concurrency) for i in range(trials)]


def bench_reaction(
    nodes: int = 100, trials: int = 5, concurrency: int = 32, keep: Path | None = None
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
            return asyncio.run(_trials(cluster, kubectl, nodes, trials, concurrency))
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
    safe = [t.safe_s for t in trials]
    lines.append(
        f"crossing T2 -> caps keep the row under T2: median {statistics.median(safe) * 1000:.0f} ms, "
        f"max {max(safe) * 1000:.0f} ms"
    )
    return "\n".join(lines)
