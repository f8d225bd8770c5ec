"""One level-based reconcile loop per kind, wired into kopf.

Every kind registers a single `reconcile(ctx)` coroutine. It runs on create,
on spec changes, on operator start (resume) and on a timer, so the status
always follows the observed state of the children, whatever event was missed.
This module owns what every reconciler shares: parsing the spec (a bad spec
sets a condition instead of crash-looping), conditions and their Events,
metrics, retries and the status patch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from ampacity.api import Resource
from ampacity.api.meta import LABEL_PREFIX, ApiModel, ConditionStatus, Status
from ampacity.kube import Kube, KubeError
from controllers import metrics

READY = "Ready"
MANAGED_BY = "ampacity-operator"


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
    try:
        spec: ApiModel = resource.spec.model_validate(body.get("spec") or {})
    except ValidationError as error:
        ctx.set_ready(False, "InvalidSpec", _validation_message(error))
        return ctx
    ctx.spec = spec
    await reconcile(ctx)
    return ctx


def controller(resource: Resource, reconcile: Reconcile, interval: float = 10.0) -> None:
    """Register the kopf handlers that drive `reconcile` for `resource`."""
    name = resource.singular

    async def handle(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any) -> None:
        # Timers and change handlers may fire together; one reconcile per object at a time.
        lock = memo.setdefault("reconcile_lock", asyncio.Lock())
        async with lock:
            await _handle(body, patch, memo, logger)

    async def _handle(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any) -> None:
        before = _parse_status(resource, body.get("status")).condition(READY)
        started = time.monotonic()
        result = "success"
        failure: Exception | None = None
        try:
            ctx = await _reconcile_once(resource, reconcile, body, memo["kube"], logger, memo)
        except Exception as error:
            result, failure = "error", error
            metrics.RECONCILE_ERRORS.labels(name).inc()
            ctx = Context(
                resource, body, None, _parse_status(resource, body.get("status")), memo["kube"], logger
            )
            reason = "ApiError" if isinstance(error, KubeError) else "ReconcileError"
            ctx.set_ready(False, reason, str(error))
        finally:
            metrics.RECONCILE_DURATION.labels(name).observe(time.monotonic() - started)
        after = ctx.status.condition(READY)
        if after is not None and after.reason == "InvalidSpec":
            result = "invalid"
        metrics.RECONCILE_TOTAL.labels(name, result).inc()

        ctx.status.observed_generation = ctx.generation
        # Dump with None values so a merge patch also clears fields that went away.
        patch.status.update(ctx.status.model_dump(mode="json", by_alias=True))
        if after is not None and (
            before is None or (before.status, before.reason) != (after.status, after.reason)
        ):
            ctx.event(after.reason, after.message, warning=after.status != ConditionStatus.TRUE)
        for event_type, reason, message in ctx.events:
            kopf.event(body, type=event_type, reason=reason, message=message[:1024])
        if failure is not None:
            raise kopf.TemporaryError(f"{type(failure).__name__}: {failure}", delay=15) from failure

    def forget(body: kopf.Body, **_: Any) -> None:
        metrics.forget_object(resource.kind, str(body.metadata.namespace or ""), str(body.metadata.name))

    group, version, plural = resource.group, resource.version, resource.plural
    handle.__name__ = handle.__qualname__ = f"reconcile_{name}"
    kopf.on.resume(group, version, plural, id="reconcile-on-resume")(handle)
    kopf.on.create(group, version, plural, id="reconcile-on-create")(handle)
    kopf.on.update(group, version, plural, id="reconcile-on-update", field="spec")(handle)
    kopf.timer(group, version, plural, id="refresh", interval=interval, initial_delay=interval)(handle)
    kopf.on.delete(group, version, plural, id="forget", optional=True)(forget)
