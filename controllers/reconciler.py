"""One level-based reconcile loop per kind, wired into kopf.

Every kind registers a single `reconcile(ctx)` coroutine. It runs on create,
on spec changes, on operator start (resume), when one of the object's children
changes (the cache's watches wake it, `controllers.wakeups`), when the reconcile
asked to be run again (`ctx.requeue_after`: a backoff ending, a poll of a
service), and otherwise on a long resync, so the status always follows the
observed state of the children, whatever event was missed, while a settled
object costs nothing. This module owns what every reconciler shares: parsing the
spec (a bad spec sets a condition instead of crash-looping), conditions and their
Events, metrics, retries (a failure is a Ready=False condition in words, retried
with a growing delay) and the status patch (not sent when nothing changed). A
reconcile reads the cluster from the shared cache (`ctx.cache`,
`controllers.cache`) and writes children with `ctx.apply`, which skips a child
that is as last applied.

Read-your-writes for the object itself: the status patch is sent here (not left
to kopf), and the object it returns is kept; a pass that starts from an older body
than that (kopf's view lags its own watch) reconciles from the written object
instead, so a pass right after another never undoes or repeats what that one did.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from ampacity.api import Resource
from ampacity.api.meta import GROUP, LABEL_PREFIX, ApiModel, ConditionStatus, Status
from ampacity.kube import (
    FLOW,
    LANE,
    ApiUnavailable,
    Flow,
    Forbidden,
    Invalid,
    Kube,
    KubeError,
    Lane,
    NotFound,
    Unauthorized,
)
from ampacity.kubeconfig import ConfigError
from controllers import metrics
from controllers.cache import ClusterCache, without_managed_fields
from controllers.wakeups import WAKEUPS_MEMO, Wakeups

READY = "Ready"
MANAGED_BY = "ampacity-operator"
#: Where the operator-wide read cache sits in kopf's memo (`controllers.settings`).
CACHE_MEMO = "cache"
#: Where a per-object memo keeps what `Context.apply` last wrote (digest, resourceVersion) per child.
APPLIED_MEMO = "applied"
#: Where a per-object memo keeps the object as its last status patch returned it (without
#: managedFields).
WRITTEN_MEMO = "written"


def manifest_digest(obj: Mapping[str, Any]) -> str:
    """What a desired child is remembered by: a write is skipped while it is the one last sent."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def unchanged_since(kind: str, child: Mapping[str, Any]) -> str:
    """What stays the same while nobody but its controller touches a child the operator applied.

    A Deployment's status moves with every rollout step (the controller-manager writes it), so
    its resourceVersion would call for an apply after each; its generation moves only with its
    spec, and its labels are compared as well (the cache keeps both, `controllers.cache`). Other
    kinds: the resourceVersion."""
    metadata = child.get("metadata") or {}
    if kind == "Deployment" and "generation" in metadata:
        return f"generation {metadata['generation']} {json.dumps(metadata.get('labels'), sort_keys=True)}"
    return f"resourceVersion {metadata.get('resourceVersion', '')}"


@dataclass
class Context:
    """What a reconcile function gets: the parsed object, its status to fill in, and a client."""

    resource: Resource
    body: kopf.Body
    spec: Any
    status: Any
    kube: Kube
    logger: Any
    events: list[tuple[str, str, str]] = field(default_factory=list)
    #: Per-object memory kept by the operator between reconciles (lost on restart).
    memo: dict[str, Any] = field(default_factory=dict)
    #: Status fields another writer owns (e.g. the trainer report endpoint): left out of the
    #: reconciler's status patch, so that each field has one writer.
    status_fields_not_owned: set[str] = field(default_factory=set)
    #: Seconds after which this object wants another pass even if nothing changes (None: the
    #: kind's resync); the soonest request of a pass wins.
    requeue_after: float | None = None
    #: Work that must see this pass's status as written (e.g. another writer deciding its own
    #: field from it), run once the status patch was sent.
    after_status: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def cache(self) -> ClusterCache:
        """The operator's shared read cache (Nodes, bound Pods, child Deployments and Services,
        NodePowers)."""
        cache = self.memo.get(CACHE_MEMO)
        if cache is None:
            raise RuntimeError("the operator's read cache was not started (controllers.settings)")
        assert isinstance(cache, ClusterCache)
        return cache

    @property
    def name(self) -> str:
        return str(self.body.metadata.name)

    @property
    def namespace(self) -> str:
        return str(self.body.metadata.namespace or "")

    @property
    def generation(self) -> int:
        return int(self.body.metadata.get("generation", 0))

    def owner_reference(self) -> dict[str, Any]:
        """Makes a child garbage-collected with this object."""
        return {
            "apiVersion": self.resource.api_version,
            "kind": self.resource.kind,
            "name": self.name,
            "uid": self.body.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def child_labels(self, component: str) -> dict[str, str]:
        """Standard labels for a child object; `selector()` finds all of them."""
        return {
            "app.kubernetes.io/name": self.resource.singular,
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": MANAGED_BY,
            f"{LABEL_PREFIX}/{self.resource.singular}": self.name,
        }

    def selector(self) -> str:
        return f"{LABEL_PREFIX}/{self.resource.singular}={self.name}"

    def child_metadata(self, name: str, component: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": self.child_labels(component),
            "ownerReferences": [self.owner_reference()],
        }

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply a child, skipped when nothing changed since this operator last applied it.

        A child the cache watches (Deployments, Services) is not written again while the desired
        object is the one last applied and nobody changed the live one since (`unchanged_since`):
        the live object comes from the cache instead, so a settled pool costs no writes, and a
        Deployment rolling out costs none for its status updates. Other kinds, and any change, go
        to the API server.
        """
        metadata = obj["metadata"]
        kind, namespace, name = obj["kind"], str(metadata.get("namespace") or ""), str(metadata["name"])
        digest = manifest_digest(obj)
        applied: dict[tuple[str, str, str], tuple[str, str]] = self.memo.setdefault(APPLIED_MEMO, {})
        cache = self.memo.get(CACHE_MEMO)
        if isinstance(cache, ClusterCache) and kind in cache.children:
            last = applied.get((kind, namespace, name))
            live = await cache.child(kind, namespace, name)
            if last is not None and live is not None and last == (digest, unchanged_since(kind, live)):
                metrics.CHILD_APPLIES_SKIPPED.labels(self.resource.singular).inc()
                return live
        # A new object's children go first of all: they are the work, its status only reports it.
        lane = LANE.set(Lane.FIRST_CHILDREN) if self.status.observed_generation == 0 else None
        try:
            result = await self.kube.apply(obj)
        finally:
            if lane is not None:
                LANE.reset(lane)
        applied[(kind, namespace, name)] = (digest, unchanged_since(kind, result))
        return result

    def set_ready(self, ready: bool, reason: str, message: str) -> None:
        self.status.set_condition(
            READY, ConditionStatus.TRUE if ready else ConditionStatus.FALSE, reason, message, self.generation
        )

    def requeue(self, seconds: float) -> None:
        """Ask for another pass within `seconds` (a backoff that ends, a service to poll)."""
        seconds = max(0.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        """Queue a Kubernetes Event on the object; posted once the reconcile ends."""
        self.events.append(("Warning" if warning else "Normal", reason, message))


Reconcile = Callable[[Context], Awaitable[None]]


def _validation_message(error: ValidationError) -> str:
    problems = [
        f"spec.{'.'.join(str(part) for part in e['loc'])}: {e['msg']}"
        for e in error.errors(include_url=False)
    ]
    return "; ".join(problems)


def _parse_status(resource: Resource, raw: Any) -> Status:
    # A status the operator cannot read (written by hand, or by another version)
    # is replaced rather than allowed to block reconciliation.
    try:
        return resource.status.model_validate(raw or {})
    except ValidationError:
        return resource.status()


async def _reconcile_once(
    resource: Resource,
    reconcile: Reconcile,
    body: kopf.Body,
    kube: Kube,
    logger: Any,
    memo: dict[str, Any] | None = None,
) -> Context:
    status = _parse_status(resource, body.get("status"))
    ctx = Context(
        resource,
        body,
        spec=None,
        status=status,
        kube=kube,
        logger=logger,
        memo=memo if memo is not None else {},
    )
    # An object admitted before the CRD limited names: its children could not be created.
    bad_name = resource.name_limit.problems(ctx.name) if resource.name_limit else []
    if bad_name:
        ctx.set_ready(False, "InvalidSpec", "; ".join(bad_name))
        return ctx
    try:
        spec: ApiModel = resource.spec.model_validate(body.get("spec") or {})
    except ValidationError as error:
        ctx.set_ready(False, "InvalidSpec", _validation_message(error))
        return ctx
    ctx.spec = spec
    await reconcile(ctx)
    return ctx


#: The first retry after a failure waits this long; later ones wait longer (see `retry_delay`).
RETRY_SECONDS = 15
MAX_RETRY_SECONDS = 300


def retry_delay(retry: int) -> int:
    """15 s, 30 s, 60 s ... up to 5 min: a reconciler that keeps failing never spins."""
    return int(min(RETRY_SECONDS * 2 ** min(retry, 10), MAX_RETRY_SECONDS))


#: The API server's words (admission plugin NamespaceLifecycle) for a write into a namespace being deleted.
TERMINATING_NAMESPACE = "because it is being terminated"


def failure_condition(kind: str, error: Exception, delay: int) -> tuple[str, str]:
    """The Ready=False reason and message for a failed reconcile, in words, never empty."""
    retrying = f"; retrying in {delay} s"
    if isinstance(error, ApiUnavailable):
        return "ApiUnavailable", f"{error.message or 'the API server did not answer'}{retrying}"
    if isinstance(error, Unauthorized):
        return (
            "ApiUnauthorized",
            f"the API server refused the operator's credentials: {error.message}{retrying}",
        )
    if isinstance(error, Forbidden) and TERMINATING_NAMESPACE in error.message:
        # Not RBAC: the namespace is being deleted, and its objects with it.
        return (
            "NamespaceTerminating",
            f"the namespace is being deleted: nothing new can be created in it{retrying}",
        )
    if isinstance(error, Forbidden):
        return "ApiForbidden", f"the operator's RBAC does not allow this: {error.message}{retrying}"
    if isinstance(error, Invalid):
        return (
            "ChildRejected",
            f"the API server rejected an object the operator wrote: {error.message}{retrying}",
        )
    if isinstance(error, KubeError):
        return "ApiError", f"the API server refused a request: {error.message or error.status}{retrying}"
    if isinstance(error, ConfigError):
        return "ApiUnavailable", f"the operator cannot authenticate to the API server: {error}{retrying}"
    return (
        "ReconcileError",
        f"the {kind} reconciler failed unexpectedly ({type(error).__name__}); the operator log has "
        f"the details{retrying}",
    )


def _plain(value: Any) -> Any:
    """A JSON value with the None members of objects dropped (as the API server stores them)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


EventPoster = Callable[..., None]


async def reconcile_object(
    resource: Resource,
    reconcile: Reconcile,
    body: kopf.Body,
    patch: kopf.Patch,
    memo: Any,
    logger: Any,
    retry: int = 0,
    post_event: EventPoster = kopf.event,
) -> Context:
    """One reconcile of one object: parse, reconcile, set conditions and Events, put the status
    into `patch` only where it changed; returns the pass's context. A failure sets
    Ready=False with a reason in words and is retried later (kopf.TemporaryError), with a growing
    delay."""
    name = resource.singular
    before = _parse_status(resource, body.get("status")).condition(READY)
    started = time.monotonic()
    result = "success"
    failure: Exception | None = None
    delay = retry_delay(retry)
    try:
        ctx = await _reconcile_once(resource, reconcile, body, memo["kube"], logger, memo)
    except Exception as error:
        result, failure = "error", error
        metrics.RECONCILE_ERRORS.labels(name).inc()
        ctx = Context(resource, body, None, _parse_status(resource, body.get("status")), memo["kube"], logger)
        reason, message = failure_condition(resource.kind, error, delay)
        metrics.RECONCILE_FAILURES.labels(name, reason).inc()
        if reason == "ReconcileError":
            logger.exception("reconcile of %s failed", ctx.name)
        else:
            logger.warning("reconcile of %s failed: %s", ctx.name, message)
        ctx.set_ready(False, reason, message)
    finally:
        metrics.RECONCILE_DURATION.labels(name).observe(time.monotonic() - started)
    after = ctx.status.condition(READY)
    if after is not None and after.reason == "InvalidSpec":
        result = "invalid"
    metrics.RECONCILE_TOTAL.labels(name, result).inc()

    ctx.status.observed_generation = ctx.generation
    # Dump with None values so a merge patch also clears fields that went away.
    status = ctx.status.model_dump(mode="json", by_alias=True, exclude=ctx.status_fields_not_owned)
    # Only the fields this reconciler writes count: another writer's fields are not ours to compare.
    observed = {k: v for k, v in _plain(body.get("status") or {}).items() if k in status}
    if _plain(status) == observed:
        metrics.STATUS_PATCHES_SKIPPED.labels(name).inc()
    else:
        patch.status.update(status)
    if after is not None and (
        before is None or (before.status, before.reason) != (after.status, after.reason)
    ):
        ctx.event(after.reason, after.message, warning=after.status != ConditionStatus.TRUE)
    for event_type, event_reason, event_message in ctx.events:
        post_event(body, type=event_type, reason=event_reason, message=event_message[:1024])
    if failure is not None:
        condition = ctx.status.condition(READY)
        raise kopf.TemporaryError(condition.message if condition else str(failure), delay=delay) from failure
    return ctx


def _version(obj: Mapping[str, Any]) -> int | None:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion", ""))
    except ValueError:
        return None


def freshest(body: kopf.Body, memo: Mapping[str, Any]) -> kopf.Body:
    """`body`, or the object as this operator's last status patch returned it when `body` is older
    (resourceVersions are etcd revisions, compared as numbers as client-go's caches do)."""
    written = memo.get(WRITTEN_MEMO)
    if written is None:
        return body
    seen, ours = _version(body), _version(written)
    if seen is not None and ours is not None and seen < ours:
        return kopf.Body(copy.deepcopy(written))
    return body


async def run_pass(
    resource: Resource,
    reconcile: Reconcile,
    body: kopf.Body,
    memo: Any,
    logger: Any,
    retry: int = 0,
    post_event: EventPoster = kopf.event,
) -> float | None:
    """One pass as the operator runs it: reconcile from the freshest body, send the status patch,
    keep what it returned (`freshest`); returns the pass's `requeue_after`.

    A pass over a generation the status has not observed yet (a new object, a spec change) sends
    its requests ahead of other passes' (`ampacity.kube.Lane`): under load, what a user just
    applied is acted on first. Its requests are one `Flow`: in a lane, a pass that has sent fewer
    goes first, so a new object's first child does not wait for the children of objects created
    before it."""
    body = freshest(body, memo)
    observed = (body.get("status") or {}).get("observedGeneration")
    lane = LANE.set(Lane.NEW_GENERATION if observed != body.metadata.get("generation") else Lane.ROUTINE)
    flow = FLOW.set(Flow())
    try:
        ctx = await _reconcile_and_write(resource, reconcile, body, memo, logger, retry, post_event)
    finally:
        FLOW.reset(flow)
        LANE.reset(lane)
    return ctx.requeue_after


async def _reconcile_and_write(
    resource: Resource,
    reconcile: Reconcile,
    body: kopf.Body,
    memo: Any,
    logger: Any,
    retry: int,
    post_event: EventPoster,
) -> Context:
    patch = kopf.Patch()
    try:
        ctx = await reconcile_object(resource, reconcile, body, patch, memo, logger, retry, post_event)
    finally:
        status = dict(patch.get("status") or {})
        if status:
            with contextlib.suppress(NotFound):  # deleted meanwhile: nothing left to write to
                # Kept without managedFields (each field manager's list of the status's fields,
                # often the larger part of the object): nothing reads them, and one is kept per object.
                memo[WRITTEN_MEMO] = without_managed_fields(
                    await memo["kube"].patch_status(
                        resource.kind, body.metadata.namespace, str(body.metadata.name), status
                    )
                )
    for work in ctx.after_status:
        await work()
    return ctx


#: Seconds between passes of an object nothing wakes (the safety net for a missed event).
RESYNC_SECONDS = 300.0
#: How long a pass woken by a child's change waits for the rest of the burst.
WAKE_COALESCE_SECONDS = 1.0
#: Where the operator-wide set of reconcile loops sits in kopf's memo (`controllers.settings`).
LOOPS_MEMO = "reconcile_loops"
#: Per-object memo: the object as its latest watch event showed it; the generation the last pass
#: started from; the trigger's last value; the event that runs a pass at once; the loop's task.
LATEST_BODY = "latest_body"
PASSED_GENERATION = "passed_generation"
TRIGGER_SEEN = "trigger_seen"
URGENT = "urgent"
LOOP = "reconcile_loop"
#: The finalizer kopf added to every object while a kopf daemon ran per object (before the loops
#: below): a kind without a `release` handler takes it off, or its objects could never be deleted.
KOPF_FINALIZER = f"{GROUP}/finalizer"


class ReconcileLoops:
    """The operator's per-object reconcile loops, held so that cleanup stops them before the
    client they use is closed."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, loop: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(loop)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _first_of(events: list[asyncio.Event], seconds: float) -> None:
    """Until one of `events` is set or `seconds` pass."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _drop_kopf_finalizer(resource: Resource, body: kopf.Body, memo: Any) -> None:
    """Take off the finalizer an earlier operator's kopf daemon left (optimistically: a conflict
    means a newer event, which brings the finalizer here again)."""
    finalizers = list(body.metadata.get("finalizers") or [])
    rest = [f for f in finalizers if f != KOPF_FINALIZER]
    metadata = {"finalizers": rest, "resourceVersion": body.metadata.get("resourceVersion")}
    with contextlib.suppress(KubeError):
        await memo["kube"].patch(
            resource.kind, body.metadata.namespace, str(body.metadata.name), {"metadata": metadata}
        )


def event_handler(
    resource: Resource,
    reconcile: Reconcile,
    interval: float = RESYNC_SECONDS,
    trigger: Callable[[kopf.Body], object] | None = None,
    forget: Callable[[kopf.Body, Any], None] | None = None,
    keep_kopf_finalizer: bool = False,
    post_event: EventPoster = kopf.event,
) -> Callable[..., Awaitable[None]]:
    """The kopf event handler behind `controller`: it keeps the object's latest body, starts its
    loop on the first event, runs a pass at once on a spec change or a trigger, and stops the loop
    on DELETED."""
    name = resource.singular

    async def run_loop(key: tuple[str, str, str], memo: Any, logger: Any) -> None:
        wakeups = memo.get(WAKEUPS_MEMO)
        wake = wakeups.register(key) if isinstance(wakeups, Wakeups) else asyncio.Event()
        urgent: asyncio.Event = memo[URGENT]
        retry, due = 0, time.monotonic()  # the first pass at once
        try:
            while True:
                await _first_of([urgent, wake], due - time.monotonic())
                if not urgent.is_set() and not wake.is_set() and time.monotonic() < due:
                    continue
                if wake.is_set() and not urgent.is_set():
                    # Children change in bursts (a Deployment rolling out, a gang's pods
                    # starting): one pass for the burst, not one per watch event.
                    await asyncio.sleep(WAKE_COALESCE_SECONDS)
                wake.clear()
                urgent.clear()
                body: kopf.Body = memo[LATEST_BODY]
                memo[PASSED_GENERATION] = body.metadata.get("generation")
                try:
                    requeue = await run_pass(resource, reconcile, body, memo, logger, retry, post_event)
                except kopf.TemporaryError as error:
                    retry, delay = retry + 1, float(error.delay or RETRY_SECONDS)
                except KubeError as error:  # the status patch itself failed
                    logger.warning("writing the status of %s failed: %s", key[2], error)
                    retry, delay = retry + 1, float(retry_delay(retry))
                except Exception:  # a loop that ends would leave the object unreconciled
                    logger.exception("a pass over %s failed", key[2])
                    retry, delay = retry + 1, float(retry_delay(retry))
                else:
                    retry, delay = 0, interval if requeue is None else min(interval, requeue)
                due = time.monotonic() + delay
        finally:
            if isinstance(wakeups, Wakeups):
                wakeups.unregister(key, wake)

    async def on_event(
        event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any
    ) -> None:
        key = (name, str(body.metadata.namespace or ""), str(body.metadata.name))
        if event.get("type") == "DELETED":
            loop = memo.pop(LOOP, None)
            if loop is not None:
                loop.cancel()
            metrics.forget_object(resource.kind, key[1], key[2])
            if forget is not None:
                forget(body, memo)
            return
        if not keep_kopf_finalizer and KOPF_FINALIZER in (body.metadata.get("finalizers") or []):
            await _drop_kopf_finalizer(resource, body, memo)
        memo[LATEST_BODY] = body
        urgent: asyncio.Event = memo.setdefault(URGENT, asyncio.Event())
        if trigger is not None:
            value = trigger(body)
            if value is not None and memo.get(TRIGGER_SEEN) != value:
                memo[TRIGGER_SEEN] = value
                urgent.set()
        if LOOP not in memo:
            loops = memo.get(LOOPS_MEMO)
            if not isinstance(loops, ReconcileLoops):  # outside the operator (a unit test)
                loops = memo[LOOPS_MEMO] = ReconcileLoops()
            memo[LOOP] = loops.start(run_loop(key, memo, logger))
        elif body.metadata.get("generation") != memo.get(PASSED_GENERATION):
            urgent.set()  # the spec changed since the last pass started

    return on_event


def controller(
    resource: Resource,
    reconcile: Reconcile,
    interval: float = RESYNC_SECONDS,
    trigger: Callable[[kopf.Body], object] | None = None,
    forget: Callable[[kopf.Body, Any], None] | None = None,
    release: Callable[..., Awaitable[None]] | None = None,
) -> None:
    """Register what drives `reconcile` for `resource`: one loop per object, started by the first
    watch event that shows it (a create, or the operator's start), that runs a pass at once, then
    whenever the spec changes, a child changes (`controllers.wakeups`), the last pass asked
    (`Context.requeue`, a retry's delay) or else every `interval` seconds.

    The loop is the operator's own task, fed by a kopf event handler, not a kopf daemon or change
    handler: those need a finalizer on every object and kopf's annotations, written before the
    first pass (one more write and watch event per object before its children, measured in
    docs/results/operator.md, run 9). A pass holds nothing that needs finishing, so deletion is not
    blocked: the DELETED event stops the loop and `forget`s the object's in-operator state.
    `release` is a deletion handler that must run before the object goes (kopf keeps its
    finalizer on those objects).

    `trigger` reads a value of the object that another writer sets to ask for a reconcile at
    once (a status field, which leaves the generation as it is): every watch event where it
    differs from the last one seen runs a pass."""
    on_event = event_handler(
        resource, reconcile, interval, trigger, forget, keep_kopf_finalizer=release is not None
    )
    on_event.__name__ = on_event.__qualname__ = f"reconcile_{resource.singular}"
    group, version, plural = resource.group, resource.version, resource.plural
    kopf.on.event(group, version, plural, id="reconcile")(on_event)
    if release is not None:
        kopf.on.delete(group, version, plural, id="release")(release)
