"""`ampacity activator`: the activator (`ampacity.serving.activator`) wired to a ServingPool.

In the cluster the operator runs it as `<pool>-activator`, behind the pool's Service, in front of
the pool's router pods. Its Kubernetes side is here, outside the pure serving package:

- the pool's pods, by component, from one list+watch (`PodDirectory`): the engines whose
  `/health` and `/is_sleeping` say whether every phase serves, and the routers a request goes to;
- the wake: a JSON merge patch of `status.activation.wakeRequestedAt` on its own ServingPool, the
  only field it writes. The operator reacts to that field at once (not at its next timer tick)
  and scales the pool up, or wakes its sleeping engines within the sleep group's fencing; so the
  engines' state and the Deployments keep one writer, the operator. The activator's RBAC is `get`
  and `patch` of that one pool's status subresource plus reading the namespace's pods;
- when a wake-up's held requests are through, it reports how long they waited
  (`lastWaitSeconds`, `waitedSeconds`) in the same field.

Without `--namespace` it runs on its own (local pools, tests of the hold): fixed `--engine` URLs,
`--upstream`, and the wake is `POST /wake_up` to the sleeping engines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from ampacity.api.meta import LABEL_PREFIX, parse_duration
from ampacity.kube import Gone, Kube, KubeError

log = logging.getLogger(__name__)

ACTIVATION_FIELD = "activation"
ROUTER = "router"
RELIST_SECONDS = 1.0


def _ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return (
        bool(status.get("podIP"))
        and not pod["metadata"].get("deletionTimestamp")
        and any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
    )


class PodDirectory:
    """The pool's Ready pods by component (`engine`, `prefill`, `decode`, `router`), kept current by
    a list+watch of the pods labelled with the pool (the router discovers engines the same way)."""

    def __init__(self, kube: Kube, namespace: str, pool: str, ports: dict[str, int]) -> None:
        self.kube, self.namespace, self.pool, self.ports = kube, namespace, pool, ports
        self.selector = f"{LABEL_PREFIX}/servingpool={pool}"
        self._pods: dict[str, dict[str, Any]] = {}
        self._turn = itertools.count()

    def urls(self, component: str) -> list[str]:
        port = self.ports[component]
        return sorted(
            f"http://{p['status']['podIP']}:{port}"
            for p in self._pods.values()
            if p["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component and _ready(p)
        )

    def router(self) -> str | None:
        """One Ready router, in turn (the Service would spread over them the same way)."""
        routers = self.urls(ROUTER)
        return routers[next(self._turn) % len(routers)] if routers else None

    def seen(self, pods: list[dict[str, Any]]) -> None:
        self._pods = {p["metadata"]["name"]: p for p in pods}

    def event(self, event: dict[str, Any]) -> None:
        pod = event.get("object") or {}
        name = pod.get("metadata", {}).get("name")
        if event.get("type") == "DELETED":
            self._pods.pop(name, None)
        elif event.get("type") in ("ADDED", "MODIFIED") and name:
            self._pods[name] = pod

    async def run(self) -> None:
        """List, then watch from the list's version; list again after any break."""
        while True:
            try:
                pods, version = await self.kube.list_with_version("Pod", self.namespace, self.selector)
                self.seen(pods)
                async for event in self.kube.watch(
                    "Pod", self.namespace, version, label_selector=self.selector
                ):
                    if event.get("type") == "ERROR":
                        raise Gone(410, "the watch expired")
                    self.event(event)
            except (KubeError, ValueError) as error:
                log.warning("watching the pods of pool %s: %s; listing again", self.pool, error)
            await asyncio.sleep(RELIST_SECONDS)


def wake_patch(now: datetime, held: int, wakes: int) -> dict[str, Any]:
    """status.activation of a wake request."""
    stamp = now.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return {ACTIVATION_FIELD: {"wakeRequestedAt": stamp, "heldRequests": held, "wakes": wakes}}


def report_patch(longest_wait: float, waited_total: float) -> dict[str, Any]:
    return {
        ACTIVATION_FIELD: {
            "heldRequests": 0,
            "lastWaitSeconds": round(longest_wait, 3),
            "waitedSeconds": round(waited_total, 3),
        }
    }


class PoolStatus:
    """The activator's writes: its own field of its own pool's status."""

    def __init__(self, kube: Kube, namespace: str, pool: str, held: Callable[[], int]) -> None:
        self.kube, self.namespace, self.pool, self._held = kube, namespace, pool, held
        self.wakes = 0

    async def wake(self) -> None:
        self.wakes += 1
        patch = wake_patch(datetime.now(UTC), self._held(), self.wakes)
        await self.kube.patch_status("ServingPool", self.namespace, self.pool, patch)

    async def report(self, longest_wait: float, waited_total: float) -> None:
        patch = report_patch(longest_wait, waited_total)
        await self.kube.patch_status("ServingPool", self.namespace, self.pool, patch)


def _phases(specs: Sequence[str]) -> dict[str, list[str]]:
    phases: dict[str, list[str]] = {}
    for spec in specs:
        phase, sep, url = spec.partition("=")
        if not sep or not url.startswith(("http://", "https://")):
            raise SystemExit(f"--engine {spec!r}: expected PHASE=URL, e.g. decode=http://10.0.0.7:8000")
        phases.setdefault(phase, []).append(url.rstrip("/"))
    return phases


def _fixed(urls: list[str]) -> Callable[[], Sequence[str]]:
    return lambda: urls


def _found(directory: PodDirectory, component: str) -> Callable[[], Sequence[str]]:
    return lambda: directory.urls(component)


def _run(args: argparse.Namespace) -> int:
    import aiohttp
    from aiohttp import web

    from ampacity.serving.activator import Activator, EngineProbe, Episode, HoldLimits, Upstream, wake_engines

    fixed = _phases(args.engine)
    if args.namespace is None and not fixed:
        raise SystemExit("give at least one --engine PHASE=URL (or --namespace to find the pool's pods)")
    if args.namespace is None and args.upstream is None:
        raise SystemExit("give --upstream (the pool's router) or --namespace to find its router pods")
    host, _, port = args.listen.rpartition(":")
    sessions: list[aiohttp.ClientSession] = []

    def session() -> aiohttp.ClientSession:
        if not sessions:
            sessions.append(aiohttp.ClientSession())
        return sessions[0]

    kube = Kube() if args.namespace is not None else None
    directory = None
    phases: dict[str, Callable[[], Sequence[str]]]
    if fixed:
        phases = {p: _fixed(urls) for p, urls in fixed.items()}
    else:
        assert kube is not None
        ports = {phase: args.engine_port for phase in args.phases.split(",")} | {ROUTER: args.router_port}
        directory = PodDirectory(kube, args.namespace, args.pool, ports)
        phases = {phase: _found(directory, phase) for phase in args.phases.split(",")}
    probe = EngineProbe(phases, session)
    upstream: str | Upstream
    if args.upstream:
        upstream = args.upstream
    else:
        assert directory is not None
        upstream = directory.router
    activator: Activator
    if kube is not None:
        status = PoolStatus(kube, args.namespace, args.pool, lambda: activator.held)

        async def report(episode: Episode) -> None:
            await status.report(episode.longest_wait, episode.waited_total)

        activator = Activator(
            args.pool,
            upstream,
            probe,
            status.wake,
            HoldLimits(args.max_queue, args.max_wait),
            report=report,
        )
    else:
        activator = Activator(
            args.pool, upstream, probe, wake_engines(probe), HoldLimits(args.max_queue, args.max_wait)
        )
    app = activator.app()
    tasks: list[asyncio.Task[None]] = []

    async def start(_app: web.Application) -> None:
        if directory is not None:
            tasks.append(asyncio.create_task(directory.run()))

    async def close(_app: web.Application) -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for s in sessions:
            await s.close()
        if kube is not None:
            await kube.close()

    app.on_startup.insert(0, start)
    app.on_cleanup.append(close)
    where = f"pods of {args.namespace}/{args.pool}" if directory else ", ".join(fixed)
    print(f"activator for pool {args.pool}: {args.listen}; engines: {where}", flush=True)
    web.run_app(app, host=host or "127.0.0.1", port=int(port), print=None)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    activator = subparsers.add_parser(
        "activator",
        help="hold requests to a ServingPool at zero or asleep, wake it at once, pass them on",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    activator.add_argument("--pool", required=True, help="the ServingPool's name")
    activator.add_argument(
        "--namespace", help="the pool's namespace: wake it through its status and find its pods"
    )
    activator.add_argument(
        "--phases", default="engine", help="the pool's phases, comma-separated: engine, or prefill,decode"
    )
    activator.add_argument("--engine-port", type=int, default=8000, help="the engines' HTTP port (8000)")
    activator.add_argument("--router-port", type=int, default=8000, help="the routers' HTTP port (8000)")
    activator.add_argument("--upstream", help="a fixed router URL instead of the pool's router pods")
    activator.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="PHASE=URL",
        help="a fixed engine to probe, by phase (prefill=, decode=, engine=), instead of the pool's pods",
    )
    activator.add_argument("--listen", default="127.0.0.1:8081", help="address to serve on (127.0.0.1:8081)")
    activator.add_argument("--max-queue", type=int, default=100, help="requests held at most (100)")
    activator.add_argument(
        "--max-wait", type=parse_duration, default=parse_duration("300s"), help="longest hold (300s)"
    )
    activator.set_defaults(func=_run)
