"""Ampacity's Kubernetes I/O: an async client that applies desired objects with server-side apply.

The operator (`controllers`) and the node agent (`agents`) share it.

Reconcilers compute the full desired state of their children and `apply`
it; server-side apply makes that idempotent, and `prune` deletes children
that are no longer desired. Connection settings and refreshed credentials come
from `ampacity.kubeconfig` (kubeconfig or in-cluster service account).

Why our own client rather than lightkube, kr8s or kubernetes_asyncio: the operator
needs a dozen verbs on plain dicts (it builds children as JSON and applies them
whole), and every one of those libraries adds a typed object layer to convert
through: lightkube 1.x has moved to the `httpx2` fork (a second HTTP stack beside
the `httpx` the project uses for its own services) and refreshes tokens only after
a 401; kr8s is an object-oriented API with its own dependency tree;
kubernetes_asyncio is the generated client of the `kubernetes` package this module
no longer needs, on aiohttp. What those libraries do that matters (paginated lists,
typed errors, rotated tokens, exec plugins, bookmarks) is here in a few hundred lines.

Failures are typed (`NotFound`, `Conflict`, `Forbidden`, `Invalid`, `ApiUnavailable`, ...,
all `KubeError`s with `.status`), and their messages say in words what was asked and what
went wrong, e.g. "GET pods: the API server did not answer within 30 s".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import enum
import heapq
import itertools
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from ampacity.kubeconfig import ConfigError, Connection
from ampacity.kubeconfig import load as load_connection

FIELD_MANAGER = "ampacity-operator"
RETRIES_ON_TOO_MANY_REQUESTS = 3
#: Transport failures (connect, timeouts, reset connections) are retried this many times.
RETRIES_ON_TRANSPORT_ERRORS = 2
#: Items per page of a LIST (`limit`/`continue`), as client-go's pager (500).
PAGE_SIZE = 500
#: Connections kept to the API server, and requests in flight at once: more wait in our own queue
#: (`_Lanes`), not in httpcore's pool, whose bookkeeping scans every connection for every
#: queued request (at 128 connections and ~1,000 objects' reconciles that scan took half the
#: operator's CPU). Watches use a pool of their own, so a request never waits behind them.
MAX_CONNECTIONS = 32
#: How long a request may wait for a free connection before that counts as the server being
#: unavailable (the measurement that motivated this saw PoolTimeouts at httpx's default).
POOL_TIMEOUT_SECONDS = 60.0
CONNECT_TIMEOUT_SECONDS = 10.0

log = logging.getLogger(__name__)

Object = dict[str, Any]


class Lane(enum.IntEnum):
    """Which queue a request waits in while every connection is busy: a lower lane goes first."""

    #: A new object's children: the work a user just asked for.
    FIRST_CHILDREN = 0
    #: The rest of a pass over a spec not reconciled yet (its status, its Secrets).
    NEW_GENERATION = 1
    #: Passes that follow children's progress, resyncs, everything else.
    ROUTINE = 2


#: The lane of the current task's requests (and of the tasks it starts). The reconciler sets it
#: per pass (`controllers.reconciler`), so under load what a user just applied gets its children
#: before passes that only follow their children's progress.
LANE: contextvars.ContextVar[Lane] = contextvars.ContextVar("ampacity_request_lane", default=Lane.ROUTINE)


class Flow:
    """The requests of one reconcile pass (`controllers.reconciler.run_pass`, and the tasks it
    starts). Within a lane a waiter of the flow granted fewest requests goes first, as in
    fq_codel's new flows (RFC 8290) and the API server's fair queuing: in a flood of creates,
    each new object's first child goes out before any object's second one."""

    __slots__ = ("granted",)

    def __init__(self) -> None:
        self.granted = 0


#: The flow of the current task's requests; None: requests that belong to no pass (one flow).
FLOW: contextvars.ContextVar[Flow | None] = contextvars.ContextVar("ampacity_request_flow", default=None)


class _FairQueue:
    """The waiters of one lane by flow: the flow granted fewest requests goes first, ties (and a
    flow's own waiters) in order of arrival."""

    def __init__(self) -> None:
        #: (the flow's grants when queued, arrival, flow); one live entry per waiting flow.
        self._heap: list[tuple[int, int, Flow]] = []
        self._waiting: dict[Flow, tuple[int, collections.deque[asyncio.Future[None]]]] = {}
        self._arrivals = itertools.count()

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def push(self, flow: Flow, waiter: asyncio.Future[None]) -> None:
        if flow not in self._waiting:
            self._enqueue(flow, collections.deque())
        self._waiting[flow][1].append(waiter)

    def remove(self, flow: Flow, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting[flow][1]
        queue.remove(waiter)
        if not queue:  # its heap entry is dropped when it comes up
            del self._waiting[flow]

    def pop(self) -> asyncio.Future[None]:
        while True:
            _, arrival, flow = heapq.heappop(self._heap)
            entry = self._waiting.get(flow)
            if entry is not None and entry[0] == arrival:
                break
        queue = entry[1]
        waiter = queue.popleft()
        flow.granted += 1
        del self._waiting[flow]
        if queue:
            self._enqueue(flow, queue)
        return waiter

    def _enqueue(self, flow: Flow, queue: collections.deque[asyncio.Future[None]]) -> None:
        arrival = next(self._arrivals)
        self._waiting[flow] = (arrival, queue)
        heapq.heappush(self._heap, (flow.granted, arrival, flow))


class _Lanes:
    """At most `limit` requests in flight; past that, waiters queue by `Lane`, and a freed slot goes
    to the lowest lane's waiter whose flow (`Flow`) was granted fewest requests (an
    asyncio.Semaphore is one first-come queue, where a new object's first child would wait behind
    every settled object's pass, and behind every child of the objects created before it)."""

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._unowned = Flow()
        self._lanes = tuple(_FairQueue() for _ in Lane)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        flow = FLOW.get() or self._unowned
        if self._free > 0 and not any(self._lanes):
            self._free -= 1
            flow.granted += 1
        else:
            waiter = asyncio.get_running_loop().create_future()
            lane = self._lanes[LANE.get()]
            lane.push(flow, waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.cancelled():
                    lane.remove(flow, waiter)
                else:  # handed a slot just as it was cancelled: pass it on
                    self._release()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        """Hand the slot to the lowest lane's next waiter, or free it."""
        for lane in self._lanes:
            if lane:
                lane.pop().set_result(None)
                return
        self._free += 1


@dataclass(frozen=True)
class Kind:
    api_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None) -> str:
        group_path = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        scope = f"/namespaces/{namespace}" if self.namespaced and namespace else ""
        suffix = f"/{quote(name)}" if name else ""
        return f"{group_path}{scope}/{self.plural}{suffix}"


KINDS = {
    "Pod": Kind("v1", "pods"),
    "Service": Kind("v1", "services"),
    "ConfigMap": Kind("v1", "configmaps"),
    "Secret": Kind("v1", "secrets"),
    "Node": Kind("v1", "nodes", namespaced=False),
    "Deployment": Kind("apps/v1", "deployments"),
    "ServiceAccount": Kind("v1", "serviceaccounts"),
    "Role": Kind("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": Kind("rbac.authorization.k8s.io/v1", "rolebindings"),
    "NodePower": Kind("ampacity.dev/v1alpha1", "nodepowers", namespaced=False),
    "PowerBudget": Kind("ampacity.dev/v1alpha1", "powerbudgets", namespaced=False),
    "TrainingJob": Kind("ampacity.dev/v1alpha1", "trainingjobs"),
    "ServingPool": Kind("ampacity.dev/v1alpha1", "servingpools"),
    "FederatedRound": Kind("ampacity.dev/v1alpha1", "federatedrounds"),
}


class KubeError(RuntimeError):
    """The API server refused a request, or could not be reached; `status` is the HTTP status
    (0 when no answer came), `reason` the Status reason (NotFound, Conflict, ...)."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message


class Unauthorized(KubeError):
    """401: the credential was refused (expired, or not for this cluster)."""


class Forbidden(KubeError):
    """403: RBAC does not allow the request."""


class NotFound(KubeError):
    """404: no such object (or no such kind: its CRD is not installed)."""


class Conflict(KubeError):
    """409: the object exists already, or changed since it was read."""


class Gone(KubeError):
    """410: a watch or a list continuation is older than the server keeps; list again."""


class Invalid(KubeError):
    """422: the object was rejected by validation (schema, CEL, admission)."""


class TooManyRequests(KubeError):
    """429: throttled (API priority and fairness) after our retries."""


class ApiUnavailable(KubeError):
    """No usable answer: connection refused or reset, a timeout, or 5xx from the server."""


_BY_STATUS: dict[int, type[KubeError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    422: Invalid,
    429: TooManyRequests,
}


def error_for(status: int, message: str, reason: str = "") -> KubeError:
    """The typed error for an HTTP status."""
    cls = ApiUnavailable if status >= 500 else _BY_STATUS.get(status, KubeError)
    return cls(status, message, reason)


def _transport_words(error: httpx.TransportError, timeout: float) -> str:
    if isinstance(error, httpx.PoolTimeout):
        return f"no connection to the API server came free within {POOL_TIMEOUT_SECONDS:g} s"
    if isinstance(error, httpx.ConnectTimeout):
        return f"could not connect to the API server within {CONNECT_TIMEOUT_SECONDS:g} s"
    if isinstance(error, httpx.TimeoutException):
        return f"the API server did not answer within {timeout:g} s"
    if isinstance(error, httpx.ConnectError):
        return f"could not connect to the API server ({error or 'connection refused'})"
    return f"the connection to the API server broke ({type(error).__name__}: {error or 'no detail'})"


def _what(method: str, path: str) -> str:
    """`GET pods ns/name` from a request path, for messages."""
    parts = path.strip("/").split("/")
    parts = parts[2:] if parts[0] == "api" else parts[3:]
    namespace = ""
    if len(parts) >= 2 and parts[0] == "namespaces" and len(parts) > 2:
        namespace, parts = parts[1], parts[2:]
    target = parts[0] if parts else path
    if len(parts) > 1:
        target += " " + (f"{namespace}/" if namespace else "") + "/".join(parts[1:])
    elif namespace:
        target += f" in {namespace}"
    return f"{method} {target}"


def _client_for(connection: Connection, timeout: float, max_connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=connection.server,
        verify=connection.tls,
        auth=connection.auth,
        timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_SECONDS, pool=POOL_TIMEOUT_SECONDS),
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=90,
        ),
        headers={"Accept": "application/json", "User-Agent": "ampacity"},
    )


class Kube:
    """A small async Kubernetes client: apply, get, list (paginated), watch, patch, delete."""

    def __init__(
        self,
        http: httpx.AsyncClient | None = None,
        kubeconfig: str | None = None,
        timeout: float = 30,
        field_manager: str = FIELD_MANAGER,
    ) -> None:
        """`kubeconfig` (a path) overrides the in-cluster/KUBECONFIG lookup; `timeout` is per request.

        `http` (tests) replaces the connection; watches then share it."""
        self.timeout = timeout
        self.field_manager = field_manager
        self._in_flight = _Lanes(MAX_CONNECTIONS)
        if http is not None:
            self._http = self._watch_http = http
        else:
            connection = load_connection(kubeconfig)
            self._http = _client_for(connection, timeout, MAX_CONNECTIONS)
            # Long-lived watches get their own pool: they must never starve requests.
            self._watch_http = _client_for(connection, timeout, 32)

    async def close(self) -> None:
        await self._http.aclose()
        if self._watch_http is not self._http:
            await self._watch_http.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # Only a request that never reached the server is safe to repeat for every verb.
        never_sent = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
        retriable = never_sent if method == "POST" else httpx.TransportError
        for attempt in range(RETRIES_ON_TRANSPORT_ERRORS + 1):
            try:
                async with self._in_flight.slot():
                    return await self._http.request(method, path, **kwargs)
            except retriable as error:
                if attempt == RETRIES_ON_TRANSPORT_ERRORS:
                    raise ApiUnavailable(
                        0, f"{_what(method, path)}: {_transport_words(error, self.timeout)}"
                    ) from error
                await asyncio.sleep(0.5 * (attempt + 1))
            except httpx.TransportError as error:
                raise ApiUnavailable(
                    0, f"{_what(method, path)}: {_transport_words(error, self.timeout)}"
                ) from error
            except ConfigError as error:
                raise Unauthorized(0, f"{_what(method, path)}: {error}") from error
        raise AssertionError("unreachable")

    async def _request(self, method: str, path: str, **kwargs: Any) -> Object:
        response = await self._send(method, path, **kwargs)
        for _ in range(RETRIES_ON_TOO_MANY_REQUESTS):
            # As client-go does: 429 (e.g. "storage is (re)initializing" right after a CRD is
            # established, or API priority and fairness) is retried after its Retry-After.
            if response.status_code != 429:
                break
            await asyncio.sleep(min(float(response.headers.get("Retry-After", "1") or 1), 2.0))
            response = await self._send(method, path, **kwargs)
        if response.status_code >= 400:
            raise self._error(method, path, response)
        body: Object = response.json()
        return body

    @staticmethod
    def _error(method: str, path: str, response: httpx.Response) -> KubeError:
        reason = ""
        try:
            body = response.json()
            message = str(body.get("message") or response.reason_phrase)
            reason = str(body.get("reason") or "")
        except ValueError:
            message = response.text.strip()[:500] or response.reason_phrase
        return error_for(response.status_code, f"{_what(method, path)}: {message}", reason)

    async def apply(self, obj: Object) -> Object:
        """Server-side apply of a complete desired object; the operator owns every field it sets."""
        kind = KINDS[obj["kind"]]
        path = kind.path(obj["metadata"].get("namespace"), obj["metadata"]["name"])
        return await self._request(
            "PATCH",
            path,
            params={"fieldManager": self.field_manager, "force": "true"},
            content=json.dumps(obj),
            headers={"Content-Type": "application/apply-patch+yaml"},
        )

    async def create(self, obj: Object) -> Object:
        """Create an object (Conflict if it exists): for kinds the operator may write but not read."""
        path = KINDS[obj["kind"]].path(obj["metadata"].get("namespace"))
        return await self._request("POST", path, params={"fieldManager": self.field_manager}, json=obj)

    async def patch_status(self, kind: str, namespace: str | None, name: str, status: Object) -> Object:
        """JSON merge patch of the status subresource (None values remove fields)."""
        return await self._request(
            "PATCH",
            f"{KINDS[kind].path(namespace, name)}/status",
            content=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def patch(self, kind: str, namespace: str | None, name: str, body: Object) -> Object:
        """JSON merge patch of an object (None values remove fields)."""
        return await self._request(
            "PATCH",
            KINDS[kind].path(namespace, name),
            content=json.dumps(body),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def get(self, kind: str, namespace: str | None, name: str) -> Object | None:
        try:
            return await self._request("GET", KINDS[kind].path(namespace, name))
        except NotFound:
            return None

    async def _pages(
        self, kind: str, namespace: str | None, label_selector: str, field_selector: str
    ) -> tuple[list[Object], str]:
        path = KINDS[kind].path(namespace)
        base = {"limit": str(PAGE_SIZE)}
        if label_selector:
            base["labelSelector"] = label_selector
        if field_selector:
            base["fieldSelector"] = field_selector
        for _ in range(3):
            items: list[Object] = []
            params = dict(base)
            try:
                while True:
                    page = await self._request("GET", path, params=params)
                    items.extend(page.get("items") or [])
                    metadata = page.get("metadata") or {}
                    if not metadata.get("continue"):
                        # Every page of one list is read at the first page's resourceVersion.
                        return items, str(metadata.get("resourceVersion", ""))
                    params = {**base, "continue": str(metadata["continue"])}
            except Gone:
                # The continue token outlived the server's compaction window: list again.
                log.info("the listing of %s expired mid-way; listing again", kind)
        raise ApiUnavailable(0, f"GET {KINDS[kind].plural}: the listing kept expiring mid-way")

    async def list_objects(
        self, kind: str, namespace: str | None, label_selector: str = "", field_selector: str = ""
    ) -> list[Object]:
        """Every matching object, read in pages of PAGE_SIZE."""
        items, _ = await self._pages(kind, namespace, label_selector, field_selector)
        return items

    async def list_with_version(
        self, kind: str, namespace: str | None, label_selector: str = "", field_selector: str = ""
    ) -> tuple[list[Object], str]:
        """Every matching object, and the list's resourceVersion to start a watch from."""
        return await self._pages(kind, namespace, label_selector, field_selector)

    async def watch(
        self,
        kind: str,
        namespace: str | None,
        resource_version: str,
        timeout_seconds: int = 300,
        label_selector: str = "",
        field_selector: str = "",
    ) -> AsyncIterator[Object]:
        """Watch events ({"type": ..., "object": ...}) after `resource_version`, bookmarks included,
        until the server closes the watch (after about `timeout_seconds`); an "ERROR" event
        (410 Gone) means relist."""
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        path = KINDS[kind].path(namespace)
        timeout = httpx.Timeout(
            timeout_seconds + 30, connect=CONNECT_TIMEOUT_SECONDS, pool=POOL_TIMEOUT_SECONDS
        )
        try:
            async with self._watch_http.stream("GET", path, params=params, timeout=timeout) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self._error("WATCH", path, response)
                async for line in response.aiter_lines():
                    if line:
                        event: Object = json.loads(line)
                        yield event
        except httpx.TransportError as error:
            raise ApiUnavailable(
                0, f"{_what('WATCH', path)}: {_transport_words(error, timeout_seconds + 30)}"
            ) from error

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        with contextlib.suppress(NotFound):
            await self._request(
                "DELETE", KINDS[kind].path(namespace, name), json={"propagationPolicy": "Background"}
            )

    async def prune(self, kind: str, namespace: str, label_selector: str, keep: set[str]) -> list[str]:
        """Delete the labelled children of `kind` whose names are not in `keep`; returns their names."""
        stale = [
            o["metadata"]["name"]
            for o in await self.list_objects(kind, namespace, label_selector)
            if o["metadata"]["name"] not in keep
        ]
        for name in stale:
            await self.delete(kind, namespace, name)
        return stale
