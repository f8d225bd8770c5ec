"""`ampacity bench scale`: the operator with many objects over many GPU nodes.

A fresh local control plane with N kwok GPU nodes (8 H100 each), the CRDs and the operator
as a local process (as `ampacity power bench-reaction` starts them). The benchmark creates
ServingPools, TrainingJobs and FederatedRounds in batches, plus PowerBudgets over all the
nodes, and watches (one list+watch per kind, as a user's dashboards would):

- create -> first child: the first Service, Deployment, Pod or Secret the operator labels
  with the object's name;
- create -> first Ready condition with a message (Ready or an explained not-ready reason);
- the operator's resident memory at start, peak and once everything settled, and its CPU
  while idle (settled: every object explained and no status changed for
  `SETTLED_QUIET_SECONDS`; only the timers running);
- API requests per second at idle that the operator causes: the API server's
  `apiserver_request_total` over a window with the operator running, minus the same window
  with it stopped (kube-controller-manager and the scheduler stay; kwok's node and lease
  heartbeat writes are left out of both, see `Bench.request_total`).

Pods of the children stay Pending or run under kwok; the engines, trainers and aggregators
are not real processes, so the conditions end in explained reasons (EnginesStarting,
AggregatorUnreachable, AwaitingTelemetry, ...), which is what is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import ssl
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ampacity.dev.cluster.kubectl import Kubectl, install_crds
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.localcluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "bench"
GROUP_PATH = "/apis/ampacity.dev/v1alpha1"
MANAGED = "app.kubernetes.io/managed-by=ampacity-operator"
#: The kinds of children the operator creates, watched for the first one of each object.
CHILD_PATHS = ("/api/v1/services", "/api/v1/secrets", "/api/v1/pods", "/apis/apps/v1/deployments")
#: The operator's HTTP failures, counted in its log.
LOG_ERRORS = ("PoolTimeout", "ConnectTimeout", "ReadError", "ReadTimeout", "RemoteProtocolError")
#: Resources kwok's fake kubelets heartbeat; only reads of them are counted (see request_total).
HEARTBEATS = ("nodes", "leases")
READS = ("LIST", "WATCH")
#: The resources the PowerBudget controller reads and writes, whose share is reported apart.
POWER_RESOURCES = ("nodepowers", "powerbudgets")


def serving_pool(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "ampacity.dev/v1alpha1",
        "kind": "ServingPool",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {"name": "llama2-70b", "uri": "hf://meta-llama/Llama-2-70b-chat-hf"},
            "engine": {"image": "vllm/vllm-openai:v0.9.2"},
            "gpuType": "h100",
            "slo": {"ttft": "1s", "tpot": "100ms"},
            # The smallest pool meeting these SLOs has 10 GPUs (one prefill/decode unit).
            "maxGpus": 16,
        },
    }


def training_job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "ampacity.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "workers": {"replicas": 2, "gpusPerWorker": 1},
            "template": {"spec": {"containers": [{"name": "trainer", "image": "trainer:bench"}]}},
            "checkpoint": {"storage": {"uri": f"s3://bench/{name}"}},
        },
    }


def federated_round(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "ampacity.dev/v1alpha1",
        "kind": "FederatedRound",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": "file:///state/global-model.npz",
            # Plain HTTP: the local operator has no CA for aggregator certificates, and a round
            # without one waits in TLSUnavailable without creating its aggregator.
            "aggregator": {"insecureHTTP": True},
            "cohortSize": 2,
            "minQuorum": 2,
            "deadline": "10m",
        },
    }


#: Objects of each kind created one at a time after the idle window (`Bench.probe`).
PROBES_PER_KIND = 5
#: How long a probe waits for its first child before the next one is created.
PROBE_TIMEOUT_SECONDS = 30.0


def probe_manifests() -> list[dict[str, Any]]:
    return [
        make(f"{prefix}-probe-{i}")
        for i in range(PROBES_PER_KIND)
        for prefix, make in (("sp", serving_pool), ("tj", training_job), ("fr", federated_round))
    ]


def power_budget(name: str, nodes: int) -> dict[str, Any]:
    return {
        "apiVersion": "ampacity.dev/v1alpha1",
        "kind": "PowerBudget",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"ampacity.dev/row": "row-a"}},
            "limitWatts": nodes * 8 * 700 / 1.1,
            "safeCapWatts": 450,
        },
    }


@dataclass
class Tracked:
    """One created object: when it was sent, and when the watches saw its child and condition."""

    kind: str
    created: float | None = None
    first_child: float | None = None
    condition: float | None = None
    reason: str = ""
    message: str = ""
    #: When its status last changed, and what it was then.
    changed: float | None = None
    status: str = ""


@dataclass
class Process:
    """The operator's memory and CPU, sampled from /proc once a second."""

    pid: int
    rss_mb: list[tuple[float, float]] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss(self) -> float:
        match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{self.pid}/status").read_text())
        return int(match.group(1)) / 1024 if match else 0.0

    def sample(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            with contextlib.suppress(OSError):
                self.rss_mb.append((time.monotonic(), self.rss()))


#: Settled: every object has its explained condition and no object's status changed for this long
#: (a condition alone is not settled: a TrainingJob says GangStarting before its gang runs).
SETTLED_QUIET_SECONDS = 15.0


def _settled(objects: dict[str, Tracked]) -> bool:
    now = time.monotonic()
    return all(
        t.condition is not None and t.changed is not None and now - t.changed >= SETTLED_QUIET_SECONDS
        for t in objects.values()
    )


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _explained(obj: dict[str, Any]) -> tuple[str, str] | None:
    for condition in obj.get("status", {}).get("conditions", []):
        if condition.get("type") == "Ready" and condition.get("reason"):
            return condition["reason"], condition.get("message", "")
    return None


class Bench:
    def __init__(self, cluster: LocalCluster, context: ssl.SSLContext, objects: dict[str, Tracked]) -> None:
        self.cluster = cluster
        self.context = context
        self.objects = objects
        #: Objects created one at a time once the rest have settled (`probe`), kept apart.
        self.probes: dict[str, Tracked] = {}
        self.child_seen: dict[str, asyncio.Event] = {}

    def tracked(self, key: str) -> Tracked | None:
        return self.objects.get(key) or self.probes.get(key)

    def client(self, connections: int = 8) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(base_url=self.cluster.server, verify=self.context, timeout=60, limits=limits)

    async def watch(
        self, path: str, on_event: Callable[[dict[str, Any]], None], params: dict[str, str]
    ) -> None:
        """List then watch `path` for ever, calling `on_event` with every object seen."""
        async with self.client(2) as client:
            while True:
                listing = (await client.get(path, params=params)).json()
                for obj in listing.get("items", []):
                    on_event(obj)
                version = listing["metadata"]["resourceVersion"]
                watch = {**params, "watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true"}
                with contextlib.suppress(httpx.HTTPError):
                    async with client.stream("GET", path, params=watch, timeout=None) as stream:
                        async for line in stream.aiter_lines():
                            event = json.loads(line)
                            if event["type"] in ("ADDED", "MODIFIED"):
                                on_event(event["object"])

    def on_child(self, obj: dict[str, Any]) -> None:
        labels = obj["metadata"].get("labels", {})
        key = f"{labels.get('app.kubernetes.io/name')}/{labels.get('app.kubernetes.io/instance')}"
        tracked = self.tracked(key)
        if tracked is not None and tracked.first_child is None:
            tracked.first_child = time.monotonic()
            if key in self.child_seen:
                self.child_seen[key].set()

    def on_object(self, obj: dict[str, Any]) -> None:
        key = f"{obj['kind'].lower()}/{obj['metadata']['name']}"
        tracked = self.tracked(key)
        explained = _explained(obj)
        if tracked is None:
            return
        if explained is not None and tracked.condition is None:
            tracked.condition = time.monotonic()
            tracked.reason, tracked.message = explained
        status = json.dumps(obj.get("status") or {}, sort_keys=True)
        if status != tracked.status:
            tracked.status, tracked.changed = status, time.monotonic()

    async def create(self, manifests: list[dict[str, Any]], batch: int, interval: float) -> None:
        async with self.client(batch) as client:
            for start in range(0, len(manifests), batch):
                began = time.monotonic()
                await asyncio.gather(*(self._create(client, m) for m in manifests[start : start + batch]))
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - began)))

    async def _create(self, client: httpx.AsyncClient, manifest: dict[str, Any]) -> None:
        kind = manifest["kind"]
        plural = f"{kind.lower()}s"
        namespace = manifest["metadata"].get("namespace")
        path = f"{GROUP_PATH}/namespaces/{namespace}/{plural}" if namespace else f"{GROUP_PATH}/{plural}"
        tracked = self.tracked(f"{kind.lower()}/{manifest['metadata']['name']}")
        assert tracked is not None
        tracked.created = time.monotonic()
        response = await client.post(path, json=manifest)
        if response.status_code != 201:
            raise RuntimeError(f"creating {kind} {manifest['metadata']['name']}: {response.text}")

    async def probe(self, manifests: list[dict[str, Any]], seconds_each: float) -> None:
        """Create `manifests` one at a time, each once the last has its first child (or after
        `seconds_each`): how long a user's apply waits for its children on a cluster that is busy
        but not flooded with creates."""
        async with self.client(1) as client:
            for manifest in manifests:
                key = f"{manifest['kind'].lower()}/{manifest['metadata']['name']}"
                self.probes[key] = Tracked(manifest["kind"])
                seen = self.child_seen[key] = asyncio.Event()
                await self._create(client, manifest)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(seen.wait(), seconds_each)

    def request_total(self) -> Counter[str]:
        """apiserver_request_total by verb and resource, summed over codes.

        kwok's node and lease heartbeats are left out: the operator never writes Nodes or Leases,
        and their rate swings with the machine's load (at 500 nodes, by more than the operator's
        whole share between two windows), which the difference would otherwise measure.
        """
        with self.cluster.http() as client:
            text = client.get("/metrics").text
        totals: Counter[str] = Counter()
        for line in text.splitlines():
            if line.startswith("apiserver_request_total{"):
                labels, value = line.rsplit(" ", 1)
                resource = re.search(r'resource="([^"]*)"', labels)
                verb = re.search(r'verb="([^"]*)"', labels)
                if resource and verb and resource.group(1) in HEARTBEATS and verb.group(1) not in READS:
                    continue
                totals[f"{verb.group(1) if verb else '?'} {resource.group(1) if resource else '?'}"] += int(
                    float(value)
                )
        return totals


def _progress(objects: dict[str, Tracked], started: float, process: Process) -> str:
    created = sum(1 for t in objects.values() if t.created is not None)
    children = sum(1 for t in objects.values() if t.first_child is not None)
    conditions = sum(1 for t in objects.values() if t.condition is not None)
    rss = process.rss_mb[-1][1] if process.rss_mb else 0.0
    return (
        f"[bench] {time.monotonic() - started:6.0f} s: created {created}/{len(objects)}, with children "
        f"{children}, with a condition {conditions}; operator RSS {rss:.0f} MB"
    )


@dataclass
class Result:
    nodes: int
    counts: dict[str, int]
    to_child_s: dict[str, list[float]]
    to_condition_s: dict[str, list[float]]
    without_child: dict[str, int]
    without_condition: dict[str, int]
    empty_messages: int
    reasons: Counter[str]
    rss_start_mb: float
    rss_peak_mb: float
    rss_settled_mb: float
    idle_cpu_cores: float
    idle_api_rps_total: float
    idle_api_rps_without_operator: float
    idle_api_top: list[tuple[str, float]]
    #: The PowerBudget controller's share (NodePowers and PowerBudgets), which another issue owns.
    idle_api_rps_power: float
    log_errors: Counter[str]
    settle_s: float
    #: create -> first child of the objects created one at a time after the idle window, by kind.
    probe_to_child_s: dict[str, list[float]] = field(default_factory=dict)

    @property
    def idle_api_rps(self) -> float:
        return self.idle_api_rps_total - self.idle_api_rps_without_operator


def run(
    nodes: int,
    serving_pools: int,
    training_jobs: int,
    federated_rounds: int,
    power_budgets: int,
    batch: int,
    interval: float,
    settle_timeout: float,
    idle_window: float,
    keep: Path | None = None,
) -> Result:
    """Run the benchmark on a fresh local control plane."""
    manifests = (
        [power_budget(f"pb-{i:04d}", nodes) for i in range(power_budgets)]
        + [serving_pool(f"sp-{i:04d}") for i in range(serving_pools)]
        + [training_job(f"tj-{i:04d}") for i in range(training_jobs)]
        + [federated_round(f"fr-{i:04d}") for i in range(federated_rounds)]
    )
    objects = {f"{m['kind'].lower()}/{m['metadata']['name']}": Tracked(m["kind"]) for m in manifests}
    with tempfile.TemporaryDirectory(prefix="ampacity-scale-") as tmp:
        state = keep or Path(tmp)
        cluster = LocalCluster(state / "cluster", progress=lambda m: print(f"[cluster] {m}", flush=True))
        cluster.up(nodes=nodes, timeout=600)
        log = state / "operator.log"
        operator = LocalOperator(cluster.kubeconfig, log)
        try:
            kubectl = Kubectl(cluster.kubeconfig)
            install_crds(kubectl, REPO / "crds")
            kubectl("create", "namespace", NAMESPACE)
            operator.start(timeout=120)
            print(f"[bench] operator started (pid {operator.pid}); log: {log}", flush=True)
            return asyncio.run(
                _measure(
                    cluster, operator, objects, manifests, nodes, batch, interval, settle_timeout, idle_window
                )
            )
        finally:
            operator.stop()
            cluster.down()


async def _measure(
    cluster: LocalCluster,
    operator: LocalOperator,
    objects: dict[str, Tracked],
    manifests: list[dict[str, Any]],
    nodes: int,
    batch: int,
    interval: float,
    settle_timeout: float,
    idle_window: float,
) -> Result:
    context = ssl.create_default_context(cafile=str(cluster.pki.ca.cert))
    context.load_cert_chain(str(cluster.pki.admin.cert), str(cluster.pki.admin.key))
    bench = Bench(cluster, context, objects)
    assert operator.pid is not None
    process = Process(operator.pid)
    stop = threading.Event()
    sampler = threading.Thread(target=process.sample, args=(stop,), daemon=True)
    await asyncio.sleep(5)  # the operator's start-up lists are done
    rss_start = process.rss()
    sampler.start()
    plurals = sorted({f"{m['kind'].lower()}s" for m in manifests})
    watches = [asyncio.create_task(bench.watch(f"{GROUP_PATH}/{p}", bench.on_object, {})) for p in plurals]
    watches += [
        asyncio.create_task(bench.watch(path, bench.on_child, {"labelSelector": MANAGED}))
        for path in CHILD_PATHS
    ]
    started = time.monotonic()
    try:
        await asyncio.sleep(2)  # the watches are open
        creating = asyncio.create_task(bench.create(manifests, batch, interval))
        deadline = time.monotonic() + settle_timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(5)
            print(_progress(objects, started, process), flush=True)
            if creating.done():
                creating.result()
                if _settled(objects):
                    break
        last_change = max((t.changed for t in objects.values() if t.changed is not None), default=started)
        settle_s = last_change - started
        print(
            f"[bench] settled after {settle_s:.0f} s (every object explained, no status changed for "
            f"{SETTLED_QUIET_SECONDS:.0f} s); idle for 30 s, then {idle_window:.0f} s measured",
            flush=True,
        )
        await asyncio.sleep(30)
        before_requests, before_cpu, t0 = bench.request_total(), process.cpu_seconds(), time.monotonic()
        await asyncio.sleep(idle_window)
        after_requests, after_cpu, t1 = bench.request_total(), process.cpu_seconds(), time.monotonic()
        rss_settled = process.rss()
        print(f"[bench] {PROBES_PER_KIND} objects of each kind created one at a time", flush=True)
        await bench.probe(probe_manifests(), PROBE_TIMEOUT_SECONDS)
    finally:
        stop.set()
        for task in watches:
            task.cancel()
    operator.stop()
    print(f"[bench] operator stopped; {idle_window:.0f} s of API requests without it", flush=True)
    await asyncio.sleep(5)
    quiet_before, q0 = bench.request_total(), time.monotonic()
    await asyncio.sleep(idle_window)
    quiet_after, q1 = bench.request_total(), time.monotonic()

    with_operator = after_requests - before_requests
    without_operator = quiet_after - quiet_before
    operator_share = {
        key: (with_operator[key] / (t1 - t0)) - (without_operator[key] / (q1 - q0)) for key in with_operator
    }
    kinds = sorted({t.kind for t in objects.values()})

    def by_kind(value: Callable[[Tracked], float | None]) -> dict[str, list[float]]:
        return {
            k: [v for t in objects.values() if t.kind == k and (v := value(t)) is not None] for k in kinds
        }

    text = operator.log.read_text(errors="replace") if operator.log.exists() else ""
    return Result(
        nodes=nodes,
        counts=dict(Counter(t.kind for t in objects.values())),
        to_child_s=by_kind(lambda t: t.first_child - t.created if t.first_child and t.created else None),
        to_condition_s=by_kind(lambda t: t.condition - t.created if t.condition and t.created else None),
        without_child={
            k: sum(1 for t in objects.values() if t.kind == k and t.first_child is None) for k in kinds
        },
        without_condition={
            k: sum(1 for t in objects.values() if t.kind == k and t.condition is None) for k in kinds
        },
        empty_messages=sum(1 for t in objects.values() if t.condition is not None and not t.message),
        reasons=Counter(f"{t.kind} {t.reason}" for t in objects.values() if t.condition is not None),
        rss_start_mb=rss_start,
        rss_peak_mb=max([rss_start] + [v for _, v in process.rss_mb]),
        rss_settled_mb=rss_settled,
        idle_cpu_cores=(after_cpu - before_cpu) / (t1 - t0),
        idle_api_rps_total=sum(with_operator.values()) / (t1 - t0),
        idle_api_rps_without_operator=sum(without_operator.values()) / (q1 - q0),
        idle_api_top=sorted(operator_share.items(), key=lambda kv: -kv[1])[:6],
        idle_api_rps_power=sum(v for k, v in operator_share.items() if k.split()[-1] in POWER_RESOURCES),
        log_errors=Counter({e: text.count(e) for e in LOG_ERRORS if e in text}),
        settle_s=settle_s,
        probe_to_child_s={
            k: [
                t.first_child - t.created
                for t in bench.probes.values()
                if t.kind == k and t.first_child and t.created
            ]
            for k in sorted({t.kind for t in bench.probes.values()})
        },
    )


def _lines(result: Result) -> Iterator[str]:
    total = sum(result.counts.values())
    yield f"scale benchmark: {total} objects over {result.nodes} kwok GPU nodes ({result.counts})"
    yield f"all created and settled (or timed out) after {result.settle_s:.0f} s"
    for kind in sorted(result.counts):
        child, cond = result.to_child_s.get(kind, []), result.to_condition_s.get(kind, [])
        child_text = (
            f"p50 {statistics.median(child):.2f} s, p99 {_quantile(child, 0.99):.2f} s"
            if child
            else "no children"
        )
        cond_text = (
            f"p50 {statistics.median(cond):.2f} s, p99 {_quantile(cond, 0.99):.2f} s" if cond else "none"
        )
        yield (
            f"  {kind:15} create -> first child {child_text} ({result.without_child[kind]} without); "
            f"-> Ready/explained condition {cond_text} ({result.without_condition[kind]} without)"
        )
    all_children = [v for values in result.to_child_s.values() for v in values]
    if all_children:
        yield f"  all kinds: create -> first child p99 {_quantile(all_children, 0.99):.2f} s (goal < 2 s)"
    for kind, values in result.probe_to_child_s.items():
        seen = f"p50 {statistics.median(values):.2f} s, max {max(values):.2f} s" if values else "no child"
        yield (
            f"  {kind:15} created one at a time on the settled cluster: create -> first child {seen} "
            f"({len(values)} of {PROBES_PER_KIND})"
        )
    yield f"  conditions with an empty message: {result.empty_messages}"
    yield "  reasons: " + ", ".join(f"{k} x{n}" for k, n in sorted(result.reasons.items()))
    yield (
        f"operator RSS: start {result.rss_start_mb:.0f} MB, peak {result.rss_peak_mb:.0f} MB, settled "
        f"{result.rss_settled_mb:.0f} MB (goal < 250 MB)"
    )
    yield f"operator CPU while idle: {result.idle_cpu_cores:.3f} cores (goal < 0.1)"
    yield (
        f"API requests/s at idle caused by the operator: {result.idle_api_rps:.1f} (goal < 20; "
        f"{result.idle_api_rps_total:.1f} with it, {result.idle_api_rps_without_operator:.1f} without)"
    )
    yield (
        "  of which the PowerBudget controller (NodePowers, PowerBudgets): "
        f"{result.idle_api_rps_power:.1f}/s;"
        f" the rest: {result.idle_api_rps - result.idle_api_rps_power:.1f}/s"
    )
    yield "  by verb and resource: " + ", ".join(f"{k} {v:.1f}/s" for k, v in result.idle_api_top)
    yield "operator log HTTP errors: " + (
        ", ".join(f"{k} x{n}" for k, n in result.log_errors.items()) or "none"
    )


def summarize(result: Result) -> str:
    return "\n".join(_lines(result))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = subparsers.add_parser("bench", help="operator benchmarks on a local control plane")
    commands = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    scale = commands.add_parser(
        "scale", help="many objects over many kwok GPU nodes: latency, memory, CPU and API load"
    )
    scale.add_argument("--nodes", type=int, default=500, help="kwok GPU nodes (8 GPUs each)")
    scale.add_argument("--serving-pools", type=int, default=400)
    scale.add_argument("--training-jobs", type=int, default=400)
    scale.add_argument("--federated-rounds", type=int, default=200)
    scale.add_argument("--power-budgets", type=int, default=1, help="PowerBudgets, each over all nodes")
    scale.add_argument("--batch", type=int, default=50, help="objects created at once")
    scale.add_argument("--interval", type=float, default=1.5, help="seconds between batches")
    scale.add_argument("--settle-timeout", type=float, default=900, help="give up waiting after this long")
    scale.add_argument("--idle-window", type=float, default=60, help="seconds of idle CPU and API requests")
    scale.add_argument("--keep", type=Path, help="keep the cluster state and operator log in this folder")
    scale.set_defaults(func=_run_scale)


def _run_scale(args: argparse.Namespace) -> int:
    result = run(
        args.nodes,
        args.serving_pools,
        args.training_jobs,
        args.federated_rounds,
        args.power_budgets,
        args.batch,
        args.interval,
        args.settle_timeout,
        args.idle_window,
        args.keep,
    )
    print(summarize(result))
    return 0
