"""Wake an object's reconcile when one of its children changes, instead of polling on a timer.

Each object's refresh loop (`controllers.reconciler.controller`) registers an `asyncio.Event` here
under (kind singular, namespace, name) and waits on it, with a long resync as a safety net. The
cache's watches of the operator's children call `child_changed` for every change: a child carries
its owner in its standard labels (`app.kubernetes.io/name` = the owner's kind, `.../instance` = its
name, `Context.child_labels`), so a Deployment becoming available, a worker pod failing or a
Service going away wakes just that owner. A settled cluster sends no events, so it costs no passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

#: Where the operator-wide registry sits in kopf's memo (`controllers.settings`).
WAKEUPS_MEMO = "wakeups"

Key = tuple[str, str, str]


class Wakeups:
    """Owner (kind singular, namespace, name) -> the event its refresh loop waits on."""

    def __init__(self) -> None:
        self._events: dict[Key, asyncio.Event] = {}

    def register(self, key: Key) -> asyncio.Event:
        """A new event for `key` (an object deleted and created again gets a fresh one)."""
        event = self._events[key] = asyncio.Event()
        return event

    def unregister(self, key: Key, event: asyncio.Event) -> None:
        """Forget `key` if `event` is still its own (not a newer object's of the same name)."""
        if self._events.get(key) is event:
            del self._events[key]

    def wake(self, key: Key) -> None:
        event = self._events.get(key)
        if event is not None:
            event.set()

    def child_changed(self, _kind: str, obj: Mapping[str, Any]) -> None:
        """A cache listener: wake the owner named in the child's labels."""
        metadata = obj.get("metadata") or {}
        labels = metadata.get("labels") or {}
        owner, name = labels.get("app.kubernetes.io/name"), labels.get("app.kubernetes.io/instance")
        if owner and name:
            self.wake((str(owner), str(metadata.get("namespace") or ""), str(name)))
