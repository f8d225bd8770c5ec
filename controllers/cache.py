"""The operator's shared read cache: one list+watch per kind it reads, instead of a LIST per reconcile.

Built once at operator start-up (`controllers.settings`, kept in kopf's memo) and closed at cleanup.
Each `Informer` lists its kind in pages, then watches from the list's resourceVersion with bookmarks
(so a reconnect resumes where it left off), and lists again when the server answers 410 Gone. What
reconcilers read (`await cache.nodes()`, `await cache.pods(...)`) waits for the first list, so a
reconcile right after start never sees an empty cluster. Objects are returned as stored: callers must
not modify them.

What is cached, and filtered at the server where it can be:
- Nodes: all (GPU capacity, labels, taints, readiness);
- Pods: only those bound to a node and not finished (`spec.nodeName!=`, phase not Succeeded/Failed):
  the ones that hold GPUs;
- Deployments and Services: only the operator's children (`app.kubernetes.io/managed-by=ampacity-operator`);
- TrainingJob workers: the operator's worker pods, in every phase (a failed or unscheduled worker
  counts for its gang);
- NodePowers: all (the node agents' telemetry).

Each object is kept as a projection (`VIEWS`: what client-go's informers do with a transform
function, `SetTransform`): only the fields some reader of the cache uses, so that the operator's
memory follows the number of objects, not their size (a bound pod's full JSON, with its pod template
and container statuses, is about five times its projection). Every object keeps `kind`, `apiVersion`
(a LIST's items carry neither) and the metadata readers use (`METADATA_KEPT`, labels); no cached
object keeps `metadata.managedFields` (server-side apply's bookkeeping). Per kind:
- Pod: `spec.nodeName`, each container's `name` and `resources` (the GPUs it holds), and
  `status.phase`, `reason`, `podIP` and the conditions' `type` and `status` (Ready);
- Node: `spec.unschedulable` and `taints`, `status.capacity`, `allocatable` and the conditions'
  `type` and `status`;
- Deployment: `spec.replicas` and the status's counts (`readyReplicas`, `availableReplicas`, ...)
  and conditions' `type` and `status`; the pod template is not kept;
- Service: the metadata only (what `Context.apply`'s skip and `prune` read);
- NodePower: the whole object (the power runtime reads its spec and status).
A reader that needs another field adds it to its kind's view (`tests/unit/controllers/test_cache_views.py`
runs each reader on a projected full manifest). Label keys and values are interned: the same few
recur on thousands of objects.

Read-your-writes: a reconciler that just wrote an object waits (`Informer.wait_for_version`) until
the watch has delivered that write's resourceVersion before it reads the cache again, or falls back
to a LIST when the watch lags. A LIST (the fallback) returns whole objects, a superset of the view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ampacity.kube import KINDS, Gone, Kube, KubeError
from controllers import metrics

log = logging.getLogger(__name__)

Object = dict[str, Any]
#: Called with ("ADDED" | "MODIFIED" | "DELETED", object) for every change after the first list.
Listener = Callable[[str, Object], None]

#: Pods that hold a node's resources: bound, and neither Succeeded nor Failed.
BOUND_POD_FIELDS = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"
MANAGED_LABELS = "app.kubernetes.io/managed-by=ampacity-operator"
TRAINING_WORKER_LABELS = f"{MANAGED_LABELS},app.kubernetes.io/name=trainingjob"
#: Seconds the server keeps a watch open before we reconnect (from the last bookmark).
WATCH_SECONDS = 300
#: Pause before listing again after a failure, growing to the last value.
BACKOFF_SECONDS = (0.5, 1, 2, 5, 10)
#: How long start-up waits for the first lists before the operator runs anyway.
SYNC_TIMEOUT_SECONDS = 120.0


def _version_number(version: str) -> int | None:
    try:
        return int(version)
    except ValueError:
        return None


def without_managed_fields(obj: Object) -> Object:
    """The object without `metadata.managedFields` (server-side apply's bookkeeping, often the
    larger part of an object's JSON), changed in place."""
    (obj.get("metadata") or {}).pop("managedFields", None)
    return obj


#: The metadata kept of every projected object, besides its labels.
METADATA_KEPT = (
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
)


def _interned(mapping: Mapping[str, Any] | None) -> dict[str, Any]:
    """A flat map (labels, resource quantities) with its string keys and values interned."""
    return {
        sys.intern(str(k)): sys.intern(v) if isinstance(v, str) else v for k, v in (mapping or {}).items()
    }


def _picked(mapping: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: mapping[k] for k in keys if k in mapping}


def _metadata(obj: Mapping[str, Any]) -> Object:
    metadata = obj.get("metadata") or {}
    kept = _picked(metadata, METADATA_KEPT)
    if "namespace" in kept:
        kept["namespace"] = sys.intern(str(kept["namespace"]))
    if "labels" in metadata:
        kept["labels"] = _interned(metadata["labels"])
    return kept


def _conditions(status: Mapping[str, Any]) -> list[Object]:
    """The conditions' `type` and `status`: what readers test (Ready, for a pod or a node)."""
    return [_interned(_picked(c, ("type", "status"))) for c in status.get("conditions") or []]


def pod_view(pod: Object) -> Object:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    kept_spec: Object = {
        "containers": [
            {
                **_picked(c, ("name",)),
                "resources": {k: _interned(v) for k, v in (c.get("resources") or {}).items()},
            }
            for c in spec.get("containers") or []
        ]
    }
    if "nodeName" in spec:
        kept_spec["nodeName"] = sys.intern(str(spec["nodeName"]))
    kept_status = _interned(_picked(status, ("phase", "reason", "podIP")))
    if "conditions" in status:
        kept_status["conditions"] = _conditions(status)
    return {"metadata": _metadata(pod), "spec": kept_spec, "status": kept_status}


def node_view(node: Object) -> Object:
    spec, status = node.get("spec") or {}, node.get("status") or {}
    kept_status: Object = {k: _interned(status[k]) for k in ("capacity", "allocatable") if k in status}
    if "conditions" in status:
        kept_status["conditions"] = _conditions(status)
    return {
        "metadata": _metadata(node),
        "spec": _picked(spec, ("unschedulable", "taints")),
        "status": kept_status,
    }


def deployment_view(deployment: Object) -> Object:
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    kept_status = {k: v for k, v in status.items() if k != "conditions"}
    if "conditions" in status:
        kept_status["conditions"] = _conditions(status)
    return {"metadata": _metadata(deployment), "spec": _picked(spec, ("replicas",)), "status": kept_status}


def service_view(service: Object) -> Object:
    return {"metadata": _metadata(service)}


#: What the cache keeps of each kind (the module docstring says why and what); the others are
#: kept whole, without managedFields.
VIEWS: dict[str, Callable[[Object], Object]] = {
    "Pod": pod_view,
    "Node": node_view,
    "Deployment": deployment_view,
    "Service": service_view,
}


def projected(kind: str, obj: Object) -> Object:
    """What the cache keeps of `obj`, an object of `kind`."""
    view = VIEWS.get(kind, without_managed_fields)(obj)
    view["kind"], view["apiVersion"] = kind, KINDS[kind].api_version
    return view


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    metadata = obj.get("metadata") or {}
    return str(metadata.get("namespace") or ""), str(metadata.get("name") or "")


def _requirement_matches(term: str, labels: Mapping[str, str]) -> bool:
    term = term.strip()
    if not term:
        return True
    for op in (" notin ", " in "):
        if op in term:
            key, _, values = term.partition(op)
            allowed = {v.strip() for v in values.strip().strip("()").split(",")}
            present = labels.get(key.strip())
            return (present in allowed) if op == " in " else (present not in allowed)
    if "!=" in term:
        key, _, value = term.partition("!=")
        return labels.get(key.strip()) != value.strip()
    if "=" in term:
        key, _, value = term.replace("==", "=").partition("=")
        return labels.get(key.strip()) == value.strip()
    if term.startswith("!"):
        return term[1:].strip() not in labels
    return term in labels


def _split_selector(selector: str) -> list[str]:
    """Split on the commas between requirements, not those inside `in (a,b)`."""
    terms, depth, current = [], 0, ""
    for char in selector:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    return [*terms, current]


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Whether `labels` satisfy a label selector in the API server's string syntax
    (`a=b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`, comma-separated)."""
    return all(_requirement_matches(t, labels) for t in _split_selector(selector))


class Informer:
    """One kind (optionally filtered by selectors), listed once and kept current by a watch."""

    def __init__(
        self,
        kube: Kube,
        kind: str,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
    ) -> None:
        self.kube, self.kind, self.namespace = kube, kind, namespace
        self.label_selector, self.field_selector = label_selector, field_selector
        self.objects: dict[tuple[str, str], Object] = {}
        self.synced = asyncio.Event()
        self.resource_version = ""
        self.listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        #: (resourceVersion, future) of readers waiting for the watch to reach that version.
        self._version_waiters: list[tuple[int, asyncio.Future[None]]] = []

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"informer-{self.kind}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _list(self) -> None:
        items, version = await self.kube.list_with_version(
            self.kind, self.namespace, self.label_selector, self.field_selector
        )
        self.objects = {_key(o): projected(self.kind, o) for o in items}
        self._reached(version)
        metrics.CACHE_LISTS.labels(self.kind).inc()
        metrics.CACHE_OBJECTS.labels(self.kind).set(len(self.objects))
        self.synced.set()

    def _apply(self, kind: str, obj: Object) -> None:
        key = _key(obj)
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        metrics.CACHE_OBJECTS.labels(self.kind).set(len(self.objects))
        for listener in self.listeners:
            try:
                listener(kind, obj)
            except Exception:  # a listener's bug must not stop the cache
                log.exception("a listener of the %s cache failed", self.kind)

    async def _watch(self) -> None:
        """Follow changes from `resource_version` until the server ends the watch."""
        async for event in self.kube.watch(
            self.kind,
            self.namespace,
            self.resource_version,
            WATCH_SECONDS,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
        ):
            kind, obj = str(event.get("type", "")), event.get("object") or {}
            if kind == "ERROR":
                code = int(obj.get("code", 0) or 0)
                raise (
                    Gone(410, str(obj.get("message", "watch expired")))
                    if code == 410
                    else KubeError(code, str(obj.get("message", "watch error")))
                )
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self._apply(kind, projected(self.kind, obj))
            version = (obj.get("metadata") or {}).get("resourceVersion")
            if version:
                self._reached(str(version))

    def _reached(self, version: str) -> None:
        """The cache holds every change up to `version`: release the readers waiting for it."""
        self.resource_version = version
        reached = _version_number(version)
        if reached is None:
            return
        waiting = []
        for wanted, future in self._version_waiters:
            if wanted <= reached:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((wanted, future))
        self._version_waiters = waiting

    async def wait_for_version(self, version: str, seconds: float) -> bool:
        """Whether the cache has seen `version` (a write's resourceVersion) within `seconds`.

        resourceVersions are etcd revisions, compared as numbers as client-go's caches do; a
        version that is not a number is never assumed seen (the caller falls back to a LIST).
        """
        wanted = _version_number(version)
        if wanted is None:
            return False
        await self.synced.wait()
        current = _version_number(self.resource_version)
        if current is not None and current >= wanted:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._version_waiters.append((wanted, future))
        try:
            await asyncio.wait_for(future, seconds)
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        failures = 0
        listed = False
        while True:
            try:
                if not listed:
                    await self._list()
                    listed = True
                await self._watch()
                failures = 0  # the server closed the watch in the normal way: resume from here
            except asyncio.CancelledError:
                raise
            except Gone:
                listed = False  # our resourceVersion is older than the server keeps: list again
                metrics.CACHE_RELISTS.labels(self.kind).inc()
            except Exception as error:  # the API server restarted, a network blip
                listed = False
                delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
                failures += 1
                log.warning(
                    "the %s cache lost its watch (%s); listing again in %g s", self.kind, error, delay
                )
                await asyncio.sleep(delay)

    async def items(self) -> list[Object]:
        await self.synced.wait()
        return list(self.objects.values())

    async def get(self, namespace: str | None, name: str) -> Object | None:
        await self.synced.wait()
        return self.objects.get((namespace or "", name))


class ClusterCache:
    """The kinds the operator reads, each cached once for every reconciler."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.node_informer = Informer(kube, "Node")
        self.pod_informer = Informer(kube, "Pod", field_selector=BOUND_POD_FIELDS)
        self.deployment_informer = Informer(kube, "Deployment", label_selector=MANAGED_LABELS)
        self.service_informer = Informer(kube, "Service", label_selector=MANAGED_LABELS)
        self.worker_informer = Informer(kube, "Pod", label_selector=TRAINING_WORKER_LABELS)
        self.node_power_informer = Informer(kube, "NodePower")
        self.informers = (
            self.node_informer,
            self.pod_informer,
            self.deployment_informer,
            self.service_informer,
            self.worker_informer,
            self.node_power_informer,
        )
        #: The operator's children, by kind, as the cache sees them (for `child` and `prune`).
        self.children = {"Deployment": self.deployment_informer, "Service": self.service_informer}

    def on_child_change(self, listener: Listener) -> None:
        """Call `listener` on every change of a child the cache watches (Deployments, Services,
        TrainingJob workers): how a child's change wakes its owner (`controllers.wakeups`)."""
        for informer in (self.deployment_informer, self.service_informer, self.worker_informer):
            informer.listeners.append(listener)

    async def start(self, sync_seconds: float = SYNC_TIMEOUT_SECONDS) -> None:
        """Start every informer and wait (up to `sync_seconds`) until each has its first list."""
        started = time.monotonic()
        for informer in self.informers:
            informer.start()
        waiting = asyncio.gather(*(i.synced.wait() for i in self.informers))
        try:
            await asyncio.wait_for(waiting, sync_seconds)
        except TimeoutError:
            late = [i.kind for i in self.informers if not i.synced.is_set()]
            log.warning("cache: no first list of %s after %g s; reads wait", ", ".join(late), sync_seconds)
            return
        sizes = ", ".join(f"{len(i.objects)} {i.kind}s" for i in self.informers)
        log.info("cache synced in %.1f s: %s", time.monotonic() - started, sizes)

    async def close(self) -> None:
        for informer in self.informers:
            await informer.close()

    async def nodes(self, selector: str = "") -> list[Object]:
        """Nodes, optionally those matching a label selector."""
        return _matching(await self.node_informer.items(), selector)

    async def node(self, name: str) -> Object | None:
        return await self.node_informer.get(None, name)

    async def pods(self, namespace: str | None = None, selector: str = "") -> list[Object]:
        """Pods bound to a node and not finished (the ones that hold GPUs), optionally of one
        namespace and label selector."""
        pods = await self.pod_informer.items()
        if namespace is not None:
            pods = [p for p in pods if p["metadata"].get("namespace") == namespace]
        return _matching(pods, selector)

    async def deployments(self, namespace: str | None = None, selector: str = "") -> list[Object]:
        """The operator's child Deployments, optionally of one namespace and label selector."""
        items = await self.deployment_informer.items()
        if namespace is not None:
            items = [d for d in items if d["metadata"].get("namespace") == namespace]
        return _matching(items, selector)

    async def workers(self, namespace: str, selector: str) -> list[Object]:
        """TrainingJob worker pods of one namespace and label selector, in every phase."""
        items = await self.worker_informer.items()
        return _matching([p for p in items if p["metadata"].get("namespace") == namespace], selector)

    async def node_powers(self) -> list[Object]:
        return await self.node_power_informer.items()

    async def child(self, kind: str, namespace: str, name: str) -> Object | None:
        """One of the operator's Deployments or Services as last seen by the watch."""
        return await self.children[kind].get(namespace, name)

    async def prune(self, kind: str, namespace: str, selector: str, keep: set[str]) -> list[str]:
        """`Kube.prune` without the LIST: delete the cached children of `kind` matching `selector`
        whose names are not in `keep` (one just deleted and still cached answers 404: no harm)."""
        informer = self.children[kind]
        stale = [
            o["metadata"]["name"]
            for o in _matching(await informer.items(), selector)
            if o["metadata"].get("namespace") == namespace and o["metadata"]["name"] not in keep
        ]
        for name in stale:
            await self.kube.delete(kind, namespace, name)
        return stale


def _matching(objects: Iterable[Object], selector: str) -> list[Object]:
    if not selector:
        return list(objects)
    return [o for o in objects if selector_matches(selector, o["metadata"].get("labels") or {})]
