"""The per-object reconcile loop behind `controllers.reconciler.controller`, driven by watch events
as kopf hands them to its event handler: a pass at once on the first event, none for an event that
changes nothing, one at once on a spec change or a trigger, the loop gone on DELETED, and no
finalizer of kopf's left on the object."""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

import kopf

from ampacity.api import FEDERATED_ROUND
from controllers.reconciler import KOPF_FINALIZER, LOOP, LOOPS_MEMO, Context, ReconcileLoops, event_handler
from tests.fakes import FakeKube
from tests.unit.controllers.test_reconcile_federatedround import round_manifest

LOG = logging.getLogger("test")


def no_event(*_: object, **__: object) -> None:
    """Events are kopf's to post (its context); these tests are about when passes run."""


def round_object() -> dict[str, Any]:
    """The reconciler tests' round, without the uid and port those need."""
    obj = round_manifest(0)
    del obj["metadata"]["uid"], obj["metadata"]["annotations"]
    return obj


class Passes:
    """A reconcile that records the generation each pass saw."""

    def __init__(self) -> None:
        self.generations: list[int] = []
        self.ran = asyncio.Event()

    async def __call__(self, ctx: Context) -> None:
        self.generations.append(ctx.generation)
        ctx.set_ready(True, "Seen", f"generation {ctx.generation}")
        self.ran.set()

    async def next(self, within: float = 0.5) -> None:
        await asyncio.wait_for(self.ran.wait(), within)
        self.ran.clear()


async def feed(handler: Any, kube: FakeKube, memo: dict[str, Any], event_type: str | None = None) -> None:
    """One watch event of the stored object, as kopf passes it."""
    stored = copy.deepcopy(kube.stored("FederatedRound", "ns", "r1"))
    await handler(event={"type": event_type, "object": stored}, body=kopf.Body(stored), memo=memo, logger=LOG)


async def test_a_pass_at_once_then_only_on_spec_changes_and_triggers() -> None:
    kube = FakeKube()
    kube.add(round_object())
    passes, loops = Passes(), ReconcileLoops()
    memo: dict[str, Any] = {"kube": kube, LOOPS_MEMO: loops}
    handler = event_handler(
        FEDERATED_ROUND, passes, 300, trigger=lambda b: b.metadata.get("labels"), post_event=no_event
    )

    await feed(handler, kube, memo, "ADDED")
    await passes.next()  # the first event's pass, with no wait for a child or a timer
    assert passes.generations == [1]
    assert kube.stored("FederatedRound", "ns", "r1")["status"]["conditions"][0]["reason"] == "Seen"

    await feed(handler, kube, memo, "MODIFIED")  # our own status patch coming back: nothing new
    await asyncio.sleep(0.1)
    assert passes.generations == [1]

    await kube.patch("FederatedRound", "ns", "r1", {"spec": {"cohortSize": 3}})
    await feed(handler, kube, memo, "MODIFIED")
    await passes.next()
    assert passes.generations == [1, 2]

    await kube.patch("FederatedRound", "ns", "r1", {"metadata": {"labels": {"wake": "now"}}})
    await feed(handler, kube, memo, "MODIFIED")
    await passes.next()
    assert passes.generations == [1, 2, 2]

    loop = memo[LOOP]
    forgotten: list[str] = []
    gone = event_handler(
        FEDERATED_ROUND,
        passes,
        forget=lambda body, _: forgotten.append(body.metadata.name),
        post_event=no_event,
    )
    await feed(gone, kube, memo, "DELETED")
    await asyncio.sleep(0.01)
    assert loop.cancelled() and LOOP not in memo and forgotten == ["r1"]
    assert len(loops) == 0


async def test_kopf_finalizer_of_an_earlier_operator_is_taken_off() -> None:
    """Objects created under kopf daemons carry kopf's finalizer; with no daemon left to stop,
    it would block their deletion forever. A kind with a deletion handler keeps it."""
    kube = FakeKube()
    obj = round_object()
    obj["metadata"]["finalizers"] = [KOPF_FINALIZER, "example.com/other"]
    kube.add(obj)
    passes, loops = Passes(), ReconcileLoops()

    kept: dict[str, Any] = {"kube": kube, LOOPS_MEMO: loops}
    await feed(
        event_handler(FEDERATED_ROUND, passes, keep_kopf_finalizer=True, post_event=no_event), kube, kept
    )
    await passes.next()
    assert kube.stored("FederatedRound", "ns", "r1")["metadata"]["finalizers"] == [
        KOPF_FINALIZER,
        "example.com/other",
    ]

    dropped: dict[str, Any] = {"kube": kube, LOOPS_MEMO: loops}
    await feed(event_handler(FEDERATED_ROUND, passes, post_event=no_event), kube, dropped)
    await passes.next()
    assert kube.stored("FederatedRound", "ns", "r1")["metadata"]["finalizers"] == ["example.com/other"]
    await loops.close()
    assert len(loops) == 0
