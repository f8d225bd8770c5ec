"""One level-based reconcile loop per kind, wired into kopf.

Every kind registers a single `reconcile(ctx)` coroutine. It runs on create,
on spec changes, on operator start (resume) and on a timer, so the status
always follows the observed state of the children, whatever event was missed.
This module owns what every reconciler shares: parsing the spec (a bad spec
sets a condition instead of crash-looping), conditions and their Events,
metrics, retries (a failure is a Ready=False condition in words, retried with a
growing delay) and the status patch (not sent when nothing changed). A reconcile
reads the cluster from the shared cache (`ctx.cache`, `controllers.cache`) and
writes children with `ctx.apply`, which skips a child that is as last applied.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from ampacity.api import Resource
from ampacity.api.meta import LABEL_PREFIX, ApiModel, ConditionStatus, Status
from ampacity.kube import ApiUnavailable, Forbidden, Invalid, Kube, KubeError, Unauthorized
from ampacity.kubeconfig import ConfigError
from controllers import metrics
from controllers.cache import ClusterCache

READY = "Ready"
MANAGED_BY = "ampacity-operator"
#: Where the operator-wide read cache sits in kopf's memo (`controllers.settings`).
CACHE_MEMO = "cache"
#: Where a per-object memo keeps what `Context.apply` last wrote (digest, resourceVersion) per child.
APPLIED_MEMO = "applied"


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
        object is the one last applied and the live one is still the version that apply returned
        (nobody changed it since): the live object comes from the cache instead, so a settled pool
        costs no writes. Other kinds, and any change, go to the API server.
        """
        metadata = obj["metadata"]
        kind, namespace, name = obj["kind"], str(metadata.get("namespace") or ""), str(metadata["name"])
        digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
        applied: dict[tuple[str, str, str], tuple[str, str]] = self.memo.setdefault(APPLIED_MEMO, {})
        cache = self.memo.get(CACHE_MEMO)
        if isinstance(cache, ClusterCache) and kind in cache.children:
            last = applied.get((kind, namespace, name))
            live = await cache.child(kind, namespace, name)
            version = str((live or {}).get("metadata", {}).get("resourceVersion", ""))
            if last is not None and live is not None and last == (digest, version):
                metrics.CHILD_APPLIES_SKIPPED.labels(self.resource.singular).inc()
                return live
        result = await self.kube.apply(obj)
        applied[(kind, namespace, name)] = (
            digest,
            str(result.get("metadata", {}).get("resourceVersion", "")),
        )
        return result

    def set_ready(self, ready: bool, reason: str, message: str) -> None:
        self.status.set_condition(
            READY, ConditionStatus.TRUE if ready else ConditionStatus.FALSE, reason, message, self.generation
        )

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
) -> None:
    """One reconcile of one object: parse, reconcile, set conditions and Events, patch the status
    only where it changed. A failure sets Ready=False with a reason in words and is retried later
    (kopf.TemporaryError), with a growing delay."""
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


def controller(
    resource: Resource,
    reconcile: Reconcile,
    interval: float = 10.0,
    trigger: Callable[[kopf.Body], object] | None = None,
) -> None:
    """Register the kopf handlers that drive `reconcile` for `resource`.

    `trigger` reads a value of the object that another writer sets to ask for a reconcile at
    once (a status field, which kopf's change handlers ignore): every watch event where it differs
    from the last one seen reconciles, instead of waiting for the timer."""
    name = resource.singular

    async def handle(
        body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, retry: int = 0, **_: Any
    ) -> None:
        # Timers and change handlers may fire together; one reconcile per object at a time.
        lock = memo.setdefault("reconcile_lock", asyncio.Lock())
        async with lock:
            await reconcile_object(resource, reconcile, body, patch, memo, logger, retry)

    def forget(body: kopf.Body, **_: Any) -> None:
        metrics.forget_object(resource.kind, str(body.metadata.namespace or ""), str(body.metadata.name))

    group, version, plural = resource.group, resource.version, resource.plural
    handle.__name__ = handle.__qualname__ = f"reconcile_{name}"
    kopf.on.resume(group, version, plural, id="reconcile-on-resume")(handle)
    kopf.on.create(group, version, plural, id="reconcile-on-create")(handle)
    kopf.on.update(group, version, plural, id="reconcile-on-update", field="spec")(handle)
    kopf.timer(group, version, plural, id="refresh", interval=interval, initial_delay=interval)(handle)
    kopf.on.delete(group, version, plural, id="forget", optional=True)(forget)
    if trigger is not None:
        read = trigger

        async def triggered(
            body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any
        ) -> None:
            value = read(body)
            if value is None or memo.get("trigger_seen") == value:
                return
            memo["trigger_seen"] = value
            await handle(body=body, patch=patch, memo=memo, logger=logger)

        triggered.__name__ = triggered.__qualname__ = f"reconcile_{name}_triggered"
        kopf.on.event(group, version, plural, id="reconcile-on-trigger")(triggered)
