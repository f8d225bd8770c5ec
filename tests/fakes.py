"""An in-memory stand-in for `ampacity.kube.Kube`, our own collaborator, for the reconcile-level unit tier.

It keeps objects the way the API server does where reconcilers can tell the difference:
uids, resourceVersions (one counter for the whole store), `generation` bumped on spec
changes, server-side apply merging maps and replacing lists, merge patches (None removes),
label and field selectors, owner-reference garbage collection on delete, paginated lists
(`limit`/`continue`) and watches (with bookmarks, and 410 Gone for a version older than the
store keeps), so `controllers.cache.ClusterCache` runs against it unchanged.

Failures are injected with `fail(...)` (the next matching calls raise a given `KubeError`)
or `down` (every call raises `ApiUnavailable`, as a client whose server does not answer).

`Operator` drives a reconciler as the operator does (`controllers.reconciler.run_pass`: parse,
reconcile, conditions, Events, one status merge patch, skipped when unchanged) against the fake
and a `ClusterCache` over it, whose child watches wake owners through `Wakeups` (`woken` says
which were).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf

from ampacity.api import Resource
from ampacity.kube import KINDS, ApiUnavailable, Conflict, Kube, KubeError, NotFound
from controllers.cache import ClusterCache, selector_matches
from controllers.reconciler import CACHE_MEMO, Reconcile, run_pass
from controllers.wakeups import WAKEUPS_MEMO, Key, Wakeups

Object = dict[str, Any]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def apply_merge(target: Any, applied: Any) -> Any:
    """Server-side apply, simplified: maps merge, everything else (lists included) is replaced."""
    if not isinstance(applied, dict) or not isinstance(target, dict):
        return copy.deepcopy(applied)
    result = dict(target)
    for key, value in applied.items():
        result[key] = apply_merge(result.get(key), value)
    return result


def _field(obj: Object, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def field_matches(selector: str, obj: Object) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            path, _, value = term.partition("!=")
            if _field(obj, path) == value:
                return False
        else:
            path, _, value = term.replace("==", "=").partition("=")
            if _field(obj, path) != value:
                return False
    return True


@dataclass
class Failure:
    method: str
    kind: str | None
    error: KubeError
    times: int


class FakeKube(Kube):
    """The in-memory API server and client in one (see the module docstring)."""

    def __init__(self, page_size: int = 500) -> None:  # no connection to make
        self.field_manager = "ampacity-operator"
        self.timeout = 30.0
        self.objects: dict[tuple[str, str, str], Object] = {}
        self.version = 0
        self.page_size = page_size
        #: Every call, as (method, kind), in order.
        self.calls: list[tuple[str, str]] = []
        #: Every status merge patch, as (kind, namespace, name, patch), in order.
        self.status_patches: list[tuple[str, str, str, Object]] = []
        self.down = False
        self.failures: list[Failure] = []
        self._watchers: list[tuple[str, asyncio.Queue[Object]]] = []
        #: Events older than this resourceVersion are compacted: watches from before it get 410.
        self.compacted = 0
        self._history: list[tuple[int, str, Object]] = []

    # -- test controls -----------------------------------------------------------------------------

    def fail(self, method: str, error: KubeError, kind: str | None = None, times: int = 1) -> None:
        """The next `times` calls of `method` (on `kind`, if given) raise `error`."""
        self.failures.append(Failure(method, kind, error, times))

    def add(self, obj: Object) -> Object:
        """Put an object in the store as if someone else created it (a Node, a user's pod)."""
        return self._store(copy.deepcopy(obj), created=True)

    def stored(self, kind: str, namespace: str | None, name: str) -> Object | None:
        return self.objects.get((kind, namespace or "", name))

    def of_kind(self, kind: str) -> list[Object]:
        return [o for (k, _, _), o in sorted(self.objects.items()) if k == kind]

    def count(self, method: str, kind: str | None = None) -> int:
        return sum(1 for m, k in self.calls if m == method and (kind is None or k == kind))

    # -- the store ---------------------------------------------------------------------------------

    def _check(self, method: str, kind: str) -> None:
        self.calls.append((method, kind))
        if self.down:
            raise ApiUnavailable(
                0, f"{method} {KINDS[kind].plural}: the API server did not answer within 30 s"
            )
        for failure in self.failures:
            if failure.method == method and failure.kind in (None, kind) and failure.times > 0:
                failure.times -= 1
                raise failure.error

    def _key(self, kind: str, namespace: str | None, name: str) -> tuple[str, str, str]:
        return kind, (namespace or "") if KINDS[kind].namespaced else "", name

    def _notify(self, event_type: str, obj: Object) -> None:
        self._history.append((self.version, event_type, copy.deepcopy(obj)))
        for kind, queue in self._watchers:
            if kind == obj["kind"]:
                queue.put_nowait({"type": event_type, "object": copy.deepcopy(obj)})

    def _store(self, obj: Object, created: bool, spec_changed: bool = False) -> Object:
        self.version += 1
        metadata = obj.setdefault("metadata", {})
        metadata["resourceVersion"] = str(self.version)
        if created:
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            metadata["generation"] = 1
        elif spec_changed:
            metadata["generation"] = int(metadata.get("generation", 1)) + 1
        kind = obj["kind"]
        obj.setdefault("apiVersion", KINDS[kind].api_version)
        self.objects[self._key(kind, metadata.get("namespace"), metadata["name"])] = obj
        self._notify("ADDED" if created else "MODIFIED", obj)
        return copy.deepcopy(obj)

    def _update(self, kind: str, namespace: str | None, name: str, change: Any, status_only: bool) -> Object:
        current = self.objects.get(self._key(kind, namespace, name))
        if current is None:
            raise NotFound(404, f"PATCH {KINDS[kind].plural} {name}: not found", "NotFound")
        updated = change(copy.deepcopy(current))
        if status_only:  # the status subresource changes nothing else
            updated = {**current, "status": updated.get("status")}
            if updated["status"] is None:
                updated.pop("status")
        else:
            updated["status"] = current.get("status")  # ... and the main resource leaves status alone
            if updated["status"] is None:
                updated.pop("status")
        updated["metadata"] = {**current["metadata"], **{k: v for k, v in updated["metadata"].items()}}
        for fixed in ("uid", "creationTimestamp", "name", "namespace", "generation"):
            if fixed in current["metadata"]:
                updated["metadata"][fixed] = current["metadata"][fixed]
        if updated == current:
            return copy.deepcopy(current)  # a no-op write does not move the resourceVersion
        return self._store(updated, created=False, spec_changed=updated.get("spec") != current.get("spec"))

    # -- the client interface ----------------------------------------------------------------------

    async def close(self) -> None:
        for _, queue in self._watchers:
            queue.put_nowait({"type": "CLOSED"})

    async def apply(self, obj: Object) -> Object:
        kind, metadata = obj["kind"], obj["metadata"]
        self._check("apply", kind)
        key = self._key(kind, metadata.get("namespace"), metadata["name"])
        if key not in self.objects:
            return self._store(copy.deepcopy(obj), created=True)
        return self._update(kind, key[1], key[2], lambda cur: apply_merge(cur, obj), status_only=False)

    async def create(self, obj: Object) -> Object:
        kind, metadata = obj["kind"], obj["metadata"]
        self._check("create", kind)
        if self._key(kind, metadata.get("namespace"), metadata["name"]) in self.objects:
            raise Conflict(
                409, f"POST {KINDS[kind].plural}: {metadata['name']} already exists", "AlreadyExists"
            )
        return self._store(copy.deepcopy(obj), created=True)

    async def patch_status(self, kind: str, namespace: str | None, name: str, status: Object) -> Object:
        self._check("patch_status", kind)
        self.status_patches.append((kind, namespace or "", name, copy.deepcopy(status)))
        return self._update(
            kind, namespace, name, lambda cur: merge_patch(cur, {"status": status}), status_only=True
        )

    async def patch(self, kind: str, namespace: str | None, name: str, body: Object) -> Object:
        self._check("patch", kind)
        return self._update(kind, namespace, name, lambda cur: merge_patch(cur, body), status_only=False)

    async def get(self, kind: str, namespace: str | None, name: str) -> Object | None:
        self._check("get", kind)
        obj = self.objects.get(self._key(kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def _select(
        self, kind: str, namespace: str | None, label_selector: str, field_selector: str
    ) -> list[Object]:
        return [
            copy.deepcopy(o)
            for (k, ns, _), o in sorted(self.objects.items())
            if k == kind
            and (not namespace or ns == namespace)
            and selector_matches(label_selector, o["metadata"].get("labels") or {})
            and field_matches(field_selector, o)
        ]

    async def list_objects(
        self, kind: str, namespace: str | None, label_selector: str = "", field_selector: str = ""
    ) -> list[Object]:
        items, _ = await self.list_with_version(kind, namespace, label_selector, field_selector)
        return items

    async def list_with_version(
        self, kind: str, namespace: str | None, label_selector: str = "", field_selector: str = ""
    ) -> tuple[list[Object], str]:
        items = self._select(kind, namespace, label_selector, field_selector)
        version = str(self.version)
        for _ in range(0, max(1, len(items)), self.page_size):  # one call per page, as the client pages
            self._check("list", kind)
        return items, version

    async def watch(
        self,
        kind: str,
        namespace: str | None,
        resource_version: str,
        timeout_seconds: int = 300,
        label_selector: str = "",
        field_selector: str = "",
    ) -> AsyncIterator[Object]:
        self._check("watch", kind)
        since = int(resource_version or 0)
        if since < self.compacted:
            yield {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}
            return
        queue: asyncio.Queue[Object] = asyncio.Queue()
        for version, event_type, obj in self._history:
            if version > since and obj["kind"] == kind:
                queue.put_nowait({"type": event_type, "object": copy.deepcopy(obj)})
        entry = (kind, queue)
        self._watchers.append(entry)
        try:
            while True:
                event = await queue.get()
                if event["type"] == "CLOSED":
                    return
                obj = event["object"]
                if event["type"] not in ("BOOKMARK", "ERROR"):
                    if namespace and obj["metadata"].get("namespace") != namespace:
                        continue
                    if not selector_matches(label_selector, obj["metadata"].get("labels") or {}):
                        continue
                    if not field_matches(field_selector, obj):
                        # An object leaving a field selector is a DELETED event for that watch.
                        if event["type"] == "MODIFIED":
                            yield {"type": "DELETED", "object": obj}
                        continue
                yield event
        finally:
            self._watchers.remove(entry)

    def bookmark(self, kind: str) -> None:
        """Send every watch of `kind` a bookmark at the current version."""
        for watched, queue in self._watchers:
            if watched == kind:
                queue.put_nowait(
                    {
                        "type": "BOOKMARK",
                        "object": {"kind": kind, "metadata": {"resourceVersion": str(self.version)}},
                    }
                )

    def expire_watches(self, kind: str) -> None:
        """Compact the history and tell every watch of `kind` it is too old (410 Gone)."""
        self.compacted = self.version + 1
        for watched, queue in self._watchers:
            if watched == kind:
                queue.put_nowait(
                    {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}
                )

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        self._check("delete", kind)
        self._delete(self._key(kind, namespace, name))

    def _delete(self, key: tuple[str, str, str]) -> None:
        obj = self.objects.pop(key, None)
        if obj is None:
            return
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self._notify("DELETED", obj)
        # The garbage collector: children whose owner is gone go too.
        uid = obj["metadata"].get("uid")
        for child_key, child in list(self.objects.items()):
            if any(ref.get("uid") == uid for ref in child["metadata"].get("ownerReferences") or []):
                self._delete(child_key)

    async def prune(self, kind: str, namespace: str, label_selector: str, keep: set[str]) -> list[str]:
        stale = [
            o["metadata"]["name"]
            for o in await self.list_objects(kind, namespace, label_selector)
            if o["metadata"]["name"] not in keep
        ]
        for name in stale:
            await self.delete(kind, namespace, name)
        return stale


@dataclass
class Pass:
    """What one reconcile did: the status patch it sent (None when skipped), its Events, its error,
    and when it asked for the next pass (None: the resync)."""

    patch: Object | None
    events: list[tuple[str, str, str]]
    error: Exception | None
    requeue_after: float | None = None


class RecordingWakeups(Wakeups):
    """`Wakeups` that also records every owner woken, registered or not."""

    def __init__(self) -> None:
        super().__init__()
        self.woken: list[Key] = []

    def wake(self, key: Key) -> None:
        self.woken.append(key)
        super().wake(key)


class Operator:
    """Drives reconcilers the way kopf does, against a `FakeKube` and a read cache over it."""

    def __init__(self, kube: FakeKube) -> None:
        self.kube = kube
        self.cache = ClusterCache(kube)
        self.wakeups = RecordingWakeups()
        self.cache.on_child_change(self.wakeups.child_changed)
        self.memo: dict[str, Any] = {"kube": kube, CACHE_MEMO: self.cache, WAKEUPS_MEMO: self.wakeups}
        #: Per-object memo, as kopf keeps one per object.
        self.object_memos: dict[str, dict[str, Any]] = {}

    async def __aenter__(self) -> Operator:
        await self.cache.start(sync_seconds=5)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.cache.close()

    async def settle(self) -> None:
        """Let the cache's watches take in what was written so far."""
        for _ in range(5):
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)

    async def reconcile(
        self, resource: Resource, reconcile: Reconcile, namespace: str | None, name: str, retry: int = 0
    ) -> Pass:
        await self.settle()
        obj = self.kube.stored(resource.kind, namespace, name)
        assert obj is not None, f"no {resource.kind} {namespace}/{name}"
        return await self.reconcile_body(resource, reconcile, copy.deepcopy(obj), retry)

    async def reconcile_body(
        self, resource: Resource, reconcile: Reconcile, body: Object, retry: int = 0
    ) -> Pass:
        """A pass from `body` as given (kopf's view of the object, possibly older than the store)."""
        events: list[tuple[str, str, str]] = []

        def post_event(_: object, *, type: str, reason: str, message: str) -> None:  # noqa: A002
            events.append((type, reason, message))

        metadata = body["metadata"]
        memo = self.object_memos.setdefault(
            f"{metadata.get('namespace')}/{metadata['name']}", dict(self.memo)
        )
        patches_before = len(self.kube.status_patches)
        error: Exception | None = None
        requeue = None
        try:
            requeue = await run_pass(
                resource, reconcile, kopf.Body(body), memo, logging.getLogger("test"), retry, post_event
            )
        except kopf.TemporaryError as raised:
            error = raised
        sent = [
            patch
            for kind, _, patched, patch in self.kube.status_patches[patches_before:]
            if (kind, patched) == (resource.kind, metadata["name"])
        ]
        # The first is the reconciler's own; work after it (`Context.after_status`) may write more.
        return Pass(sent[0] if sent else None, events, error, requeue)

    def condition(self, kind: str, namespace: str | None, name: str, type_: str = "Ready") -> Object:
        obj = self.kube.stored(kind, namespace, name) or {}
        found = [c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_]
        assert found, f"{kind} {name} has no {type_} condition: {obj.get('status')}"
        return found[0]
