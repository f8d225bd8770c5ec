"""The activator: holds requests to a pool that has no ready engine, wakes it at once, and lets
them through when it can serve.

Without it a pool at zero refuses its first request: the front Service has no endpoints and
nothing that sees the request can wake the pool. Knative Serving solves this with its activator
and KEDA's HTTP add-on with its interceptor; neither runs here. Both are Go services tied to their
own control planes: the activator reads Knative's Revision and ServerlessService objects and is
driven by Knative's autoscaler and networking layer (Kourier, Istio); the interceptor routes by
KEDA's HTTPScaledObject CRD and reports queue lengths to KEDA's external scaler, which scales
through a ScaledObject. Installing either means a second autoscaler fighting the operator over the
same Deployments. So this is the smallest component that does the activator's part, in aiohttp:

- in front of the pool's router, it proxies every request (streams included, SSE chunks as they
  come) while the pool is up;
- while it is not, it holds the request, at most `max_queue` of them and each for at most
  `max_wait` seconds, and calls `wake` at once (one wake at a time, not one per request);
- "up" is `ready()`: for a disaggregated pool, `EngineProbe` asks that every phase (prefill and
  decode) has an engine that is healthy and awake, so a pool is not up with half its phases;
- past the limits it answers 503 with `Retry-After` and a reason in words, which the `openai`
  client retries on its own;
- an upstream that refuses the connection after the pool looked up (an engine that died or went to
  sleep) sends the request back to the hold, within its wait limit, instead of failing it;
- held requests live only in memory: if the activator restarts, clients see the connection drop
  and retry (the `openai` client retries connection errors), and the new activator holds them again.

Its own endpoints live under `/activator/` (metrics, health) so that every other path goes to the
pool. Metrics: `ampacity_activator_wait_seconds` (how long each request was held),
`ampacity_activator_requests_total{outcome}`, `ampacity_activator_held_requests`,
`ampacity_activator_wakes_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)

# Headers that describe one hop, not the message (RFC 9110, section 7.6.1), and those aiohttp sets.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
# Holds last seconds to minutes (model loads); a wake seconds: buckets over both.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

# Outcomes: answered in full, refused (queue full, wait expired, pool unreachable), or broken off
# by the pool mid-response (also upstream-error).
PROXIED, QUEUE_FULL, WAIT_EXPIRED, UPSTREAM_ERROR = "proxied", "queue-full", "wait-expired", "upstream-error"

Ready = Callable[[], Awaitable[bool]]
Wake = Callable[[], Awaitable[None]]
Upstream = Callable[[], str | None]
"""The router to send a request to now (one of the pool's router pods); None: none is ready."""


@dataclass(frozen=True)
class Episode:
    """One wake-up, as the activator saw it: what `report` gets once its held requests are through."""

    held: int
    """Requests held in it."""
    longest_wait: float
    """Seconds the first held request waited."""
    waited_total: float
    """Seconds held, summed over every request since the activator started."""


Report = Callable[[Episode], Awaitable[None]]


@dataclass(frozen=True)
class HoldLimits:
    """How many requests a pool at zero holds and how long (the pool's spec sets both)."""

    max_queue: int = 100
    max_wait: float = 300.0
    """Seconds; a full cold start (pod, engine, weights) takes minutes on large models."""

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if not self.max_wait > 0:
            raise ValueError("max_wait must be more than 0 seconds")


class ActivatorMetrics:
    """The activator's metrics, in a registry of its own (one per activator, no module globals)."""

    def __init__(self, pool: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.wait = Histogram(
            "ampacity_activator_wait_seconds",
            "Seconds a request was held by the activator before it went to the pool (0: the pool was up)",
            ["pool"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        ).labels(pool)
        self._requests = Counter(
            "ampacity_activator_requests",
            "Requests through the activator, by outcome (proxied, queue-full, wait-expired, upstream-error)",
            ["pool", "outcome"],
            registry=self.registry,
        )
        self.held = Gauge(
            "ampacity_activator_held_requests",
            "Requests held now, waiting for the pool to be up",
            ["pool"],
            registry=self.registry,
        ).labels(pool)
        self.wakes = Counter(
            "ampacity_activator_wakes",
            "Wake-ups the activator started (one per episode of the pool being down with requests held)",
            ["pool"],
            registry=self.registry,
        ).labels(pool)
        self.pool = pool

    def outcome(self, outcome: str) -> None:
        self._requests.labels(self.pool, outcome).inc()


class Activator:
    """Hold-and-wake in front of one pool's router (see the module docstring)."""

    def __init__(
        self,
        pool: str,
        upstream: str | Upstream,
        ready: Ready,
        wake: Wake,
        limits: HoldLimits | None = None,
        probe_interval: float = 0.1,
        refresh_interval: float = 1.0,
        rewake_interval: float = 5.0,
        metrics: ActivatorMetrics | None = None,
        report: Report | None = None,
    ) -> None:
        self.pool = pool
        if isinstance(upstream, str):
            fixed = upstream.rstrip("/")
            self.upstream: Upstream = lambda: fixed
        else:
            self.upstream = upstream
        self._ready, self._wake = ready, wake
        self.limits = limits if limits is not None else HoldLimits()
        self.probe_interval, self.refresh_interval = probe_interval, refresh_interval
        # A wake that returned has started something (a scale-up, a /wake_up) that may take a while
        # to show: it is repeated only this long after, not on every probe.
        self.rewake_interval = rewake_interval
        self._woken_at = -math.inf
        self.metrics = metrics if metrics is not None else ActivatorMetrics(pool)
        self._up = asyncio.Event()
        self._held = 0
        self._watch: asyncio.Task[None] | None = None
        self._waking: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._report = report
        self._reports: set[asyncio.Task[None]] = set()
        # The episode under way: when its first request arrived, how many it held, all waits so far.
        self._episode_start: float | None = None
        self._episode_held = 0
        self._in_episode = 0
        self.waited_total = 0.0

    @property
    def held(self) -> int:
        """Requests held now."""
        return self._held

    # --- the pool's state ---

    async def _check(self) -> bool:
        try:
            up = await self._ready()
        except Exception as error:  # a probe that fails says "not up", it does not stop the watch
            log.warning("readiness check of pool %s failed: %s", self.pool, error)
            up = False
        if up:
            self._up.set()
        else:
            self._up.clear()
        return up

    async def _watch_until_up(self) -> None:
        """While requests are held: wake the pool once, then look until it is up."""
        try:
            while self._held > 0 and not await self._check():
                idle = self._waking is None or self._waking.done()
                if idle and time.monotonic() - self._woken_at >= self.rewake_interval:
                    self._waking = asyncio.create_task(self._start_wake())
                await asyncio.sleep(self.probe_interval)
        finally:
            self._watch = None

    async def _start_wake(self) -> None:
        self.metrics.wakes.inc()
        log.info("pool %s has no ready engine and %d held requests: waking it", self.pool, self._held)
        try:
            await self._wake()
        except Exception as error:  # retried after rewake_interval while requests are held
            log.warning("waking pool %s failed: %s", self.pool, error)
        finally:
            self._woken_at = time.monotonic()

    async def _refresh_loop(self) -> None:
        """Between holds, look now and then, so that a pool scaled to zero is seen before a
        request finds it (the proxy's connection error would also tell, one request later)."""
        while True:
            await asyncio.sleep(self.refresh_interval)
            if self._held == 0:
                await self._check()

    def _ensure_watch(self) -> None:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_until_up())

    async def _hold(self, deadline: float) -> str | None:
        """Wait until the pool is up; None when it is, else why not (a reason in words)."""
        if self._up.is_set():
            return None
        if self._held >= self.limits.max_queue:
            self.metrics.outcome(QUEUE_FULL)
            return (
                f"pool {self.pool} has no ready engine and already holds {self._held} requests"
                f" (its queue limit, activator.maxQueue={self.limits.max_queue}); retry later"
            )
        self._held += 1
        self.metrics.held.inc()
        try:
            self._ensure_watch()
            remaining = deadline - time.monotonic()
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._up.wait(), remaining)
            if self._up.is_set():
                return None
            self.metrics.outcome(WAIT_EXPIRED)
            return (
                f"pool {self.pool} did not become ready within {self.limits.max_wait:g}s"
                f" (its wait limit, activator.maxWait); the wake-up goes on, retry later"
            )
        finally:
            self._held -= 1
            self.metrics.held.dec()

    def _join(self, arrived: float) -> None:
        """A request found the pool down: it is part of this wake-up until the pool answers it."""
        if self._in_episode == 0:
            self._episode_start = arrived
        self._in_episode += 1
        self._episode_held += 1

    def _leave(self, arrived: float) -> None:
        """The pool answered the request (or it was refused); the last one ends the wake-up.

        From the request's arrival, not from one hold: a request the router refused after the
        engines came up is held again, and its wait runs on."""
        now = time.monotonic()
        self._in_episode -= 1
        self.waited_total += now - arrived
        if self._in_episode > 0:
            return
        assert self._episode_start is not None
        episode = Episode(self._episode_held, now - self._episode_start, self.waited_total)
        self._episode_start, self._episode_held = None, 0
        if self._report is not None:
            task = asyncio.create_task(self._send_report(episode))
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)

    async def _send_report(self, episode: Episode) -> None:
        assert self._report is not None
        try:
            await self._report(episode)
        except Exception as error:  # the report is for status; serving goes on without it
            log.warning("reporting the wake-up of pool %s failed: %s", self.pool, error)

    def _refuse(self, reason: str) -> web.Response:
        retry = max(1, math.ceil(min(self.limits.max_wait, 30.0)))
        return web.json_response(
            {"error": {"message": reason, "type": "ServiceUnavailable", "code": 503}},
            status=503,
            headers={"Retry-After": str(retry)},
        )

    # --- the request path ---

    async def handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        deadline = arrived + self.limits.max_wait
        body = await request.read()
        wait = _Wait(self, arrived)
        try:
            while True:
                if not self._up.is_set():
                    wait.join()
                reason = await self._hold(deadline)
                if reason is not None:
                    return self._refuse(reason)
                try:
                    response = await self._proxy(request, body, arrived, wait.leave)
                except aiohttp.ClientConnectionError as error:
                    # Nothing was sent back yet: the engine went away after the pool looked up.
                    log.info("pool %s refused a request (%s): holding it again", self.pool, error)
                    self._up.clear()
                    if time.monotonic() >= deadline:
                        self.metrics.outcome(UPSTREAM_ERROR)
                        return self._refuse(
                            f"pool {self.pool} could not be reached ({error}) and did not recover within"
                            f" {self.limits.max_wait:g}s; retry later"
                        )
                    # The engines may serve before the router does: look again after a pause.
                    await asyncio.sleep(self.probe_interval)
                    continue
                return response
        finally:
            wait.leave()

    async def _proxy(
        self, request: web.Request, body: bytes, arrived: float, answered: Callable[[], None]
    ) -> web.StreamResponse:
        assert self._session is not None, "the activator's client session starts with its app"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        base = self.upstream()
        if base is None:
            raise aiohttp.ClientConnectionError(f"no router of pool {self.pool} is ready")
        url = base.rstrip("/") + request.rel_url.path_qs
        async with self._session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        ) as upstream:
            self.metrics.wait.observe(time.monotonic() - arrived)
            answered()
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            # Chunks as they come: an SSE stream reaches the client token by token. Once the
            # answer has begun it cannot go back to the hold: an upstream that drops mid-stream
            # ends the client's response too (without a clean end, so the client sees it broke).
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except aiohttp.ClientError as error:
                log.warning("pool %s dropped a response mid-stream: %s", self.pool, error)
                self.metrics.outcome(UPSTREAM_ERROR)
                # Cut the client's connection too: a chunked answer that just stopped would read
                # as complete.
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
            self.metrics.outcome(PROXIED)
            return response

    # --- its own endpoints and lifecycle ---

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"pool": self.pool, "up": self._up.is_set(), "held": self._held})

    async def _start(self, _app: web.Application) -> None:
        # No total timeout: a generation may stream for minutes; connecting must be quick.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0)
        self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        await self._check()
        self._refresh = asyncio.create_task(self._refresh_loop())

    async def _stop(self, _app: web.Application) -> None:
        for task in (self._refresh, self._watch, self._waking, *self._reports):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session is not None:
            await self._session.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_get("/activator/metrics", self._metrics)
        app.router.add_get("/activator/healthz", self._health)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app


class _Wait:
    """One request's part in a wake-up: from when it first found the pool down until the pool
    answered it (or it was refused)."""

    def __init__(self, activator: Activator, arrived: float) -> None:
        self.activator, self.arrived = activator, arrived
        self.joined = self.left = False

    def join(self) -> None:
        if not self.joined:
            self.joined = True
            self.activator._join(self.arrived)

    def leave(self) -> None:
        if self.joined and not self.left:
            self.left = True
            self.activator._leave(self.arrived)


# --- What "up" and "wake" mean for engines that speak vLLM's protocol. ---


class EngineProbe:
    """A pool is up when every phase has an engine that serves: `GET /health` answers 200 and, if
    the engine has sleep mode (`GET /is_sleeping`), it is not asleep.

    `phases` maps a phase (`prefill`, `decode`, or `engine` for a colocated pool) to a callable
    that lists that phase's engine URLs now (from the Endpoints of its Service, or fixed).
    """

    def __init__(
        self,
        phases: Mapping[str, Callable[[], Sequence[str]]],
        session: Callable[[], aiohttp.ClientSession],
        timeout: float = 2.0,
    ) -> None:
        if not phases:
            raise ValueError("a pool has at least one phase")
        self.phases, self._session, self.timeout = phases, session, timeout

    async def serves(self, url: str) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self._session().get(f"{url}/health", timeout=timeout) as health:
                if health.status != 200:
                    return False
            async with self._session().get(f"{url}/is_sleeping", timeout=timeout) as sleeping:
                if sleeping.status == 404:
                    return True  # no sleep mode (or VLLM_SERVER_DEV_MODE off): healthy is enough
                return sleeping.status == 200 and (await sleeping.json()).get("is_sleeping") is False
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def sleeping(self) -> list[str]:
        """Engines of any phase that are up but asleep: the ones `SleepWaker` wakes."""
        found = []
        for urls in self.phases.values():
            for url in urls():
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    timeout = aiohttp.ClientTimeout(total=self.timeout)
                    async with self._session().get(f"{url}/is_sleeping", timeout=timeout) as response:
                        if response.status == 200 and (await response.json()).get("is_sleeping") is True:
                            found.append(url)
        return found

    async def __call__(self) -> bool:
        for urls in self.phases.values():
            checks = await asyncio.gather(*(self.serves(url) for url in urls()))
            if not any(checks):
                return False
        return True


def wake_engines(probe: EngineProbe, scale_up: Wake | None = None) -> Wake:
    """The wake of a pool: `POST /wake_up` to every sleeping engine (vLLM's sleep mode) and, for
    phases with no engine at all, `scale_up` (the operator scales the pool's Deployments)."""

    async def wake() -> None:
        asleep = await probe.sleeping()
        await asyncio.gather(*(_post(probe._session(), f"{url}/wake_up") for url in asleep))
        if scale_up is not None and any(not urls() for urls in probe.phases.values()):
            await scale_up()

    return wake


async def _post(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(url) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
