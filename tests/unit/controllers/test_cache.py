"""The shared read cache: first list, watch events, server-side filters, relist on 410 Gone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from controllers.cache import ClusterCache, Informer, selector_matches
from tests.fakes import FakeKube


def node(name: str, gpus: int = 8, **labels: str) -> dict:
    return {
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}},
    }


def pod(name: str, node_name: str | None, phase: str = "Running", namespace: str = "ns") -> dict:
    spec = {"nodeName": node_name} if node_name else {}
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": spec,
        "status": {"phase": phase},
    }


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(200):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("a=b", {"a": "b"}, True),
        ("a=b", {"a": "c"}, False),
        ("a!=b", {}, True),
        ("a in (x,y),c", {"a": "y", "c": ""}, True),
        ("a notin (x,y)", {"a": "x"}, False),
        ("!a", {"a": "1"}, False),
        ("", {"a": "1"}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert selector_matches(selector, labels) is expected


async def test_cache_lists_once_then_follows_the_watch() -> None:
    kube = FakeKube(page_size=2)
    for i in range(5):
        kube.add(node(f"n{i}", gpu="a100" if i % 2 else "h100"))
    kube.add(pod("running", "n0"))
    kube.add(pod("unbound", None, phase="Pending"))
    kube.add(pod("done", "n1", phase="Succeeded"))
    cache = ClusterCache(kube)
    await cache.start(sync_seconds=5)
    try:
        assert len(await cache.nodes()) == 5
        assert kube.count("list", "Node") == 3  # five nodes in pages of two
        assert {n["metadata"]["name"] for n in await cache.nodes("gpu=a100")} == {"n1", "n3"}
        # Only pods that hold a node's resources are kept.
        assert [p["metadata"]["name"] for p in await cache.pods()] == ["running"]
        lists = kube.count("list")

        kube.add(node("n9"))
        await until(lambda: cache.node("n9"), "a new node")
        await kube.patch_status("Pod", "ns", "unbound", {"phase": "Running"})
        await kube.patch("Pod", "ns", "unbound", {"spec": {"nodeName": "n2"}})
        await until(
            lambda: _has_pods(cache, {"running", "unbound"}),
            "a pod bound after the list",
        )
        await kube.patch_status("Pod", "ns", "running", {"phase": "Failed"})
        await until(lambda: _has_pods(cache, {"unbound"}), "a finished pod leaving the cache")
        await kube.delete("Node", None, "n0")
        await until(lambda: _absent(cache, "n0"), "a deleted node")
        assert kube.count("list") == lists  # every change came through the watch
        assert await cache.pods(namespace="other") == []
    finally:
        await cache.close()


async def _has_pods(cache: ClusterCache, names: set[str]) -> bool:
    return {p["metadata"]["name"] for p in await cache.pods()} == names


async def _absent(cache: ClusterCache, name: str) -> bool:
    return await cache.node(name) is None


async def test_cache_lists_again_after_410_gone_and_resumes_from_bookmarks() -> None:
    kube = FakeKube()
    kube.add(node("n0"))
    informer = Informer(kube, "Node")
    informer.start()
    try:
        await asyncio.wait_for(informer.synced.wait(), 5)
        kube.add(node("unrelated-change", gpus=1))
        await until(lambda: informer.get(None, "unrelated-change"), "a watched node")
        kube.bookmark("Node")
        await until(lambda: _at(informer, str(kube.version)), "the bookmark's resourceVersion")
        lists = kube.count("list", "Node")
        kube.expire_watches("Node")
        kube.add(node("n1"))
        await until(lambda: informer.get(None, "n1"), "the node created after 410")
        assert kube.count("list", "Node") == lists + 1
    finally:
        await informer.close()


async def _at(informer: Informer, version: str) -> bool:
    return informer.resource_version == version


async def test_reads_wait_for_the_first_list() -> None:
    kube = FakeKube()
    kube.add(node("n0"))
    kube.down = True
    cache = ClusterCache(kube)
    await cache.start(sync_seconds=0.05)  # the API server does not answer: start-up goes on
    reading = asyncio.ensure_future(cache.nodes())
    await asyncio.sleep(0.1)
    assert not reading.done()  # an empty answer would look like a cluster without nodes
    kube.down = False
    assert [n["metadata"]["name"] for n in await asyncio.wait_for(reading, 5)] == ["n0"]
    await cache.close()


async def test_listeners_hear_every_change_after_the_first_list() -> None:
    """What an event-driven engine (the power rounds) subscribes to instead of a watch of its own."""
    kube = FakeKube()
    kube.add(node("n0"))
    informer = Informer(kube, "Node")
    heard: list[tuple[str, str]] = []
    informer.listeners.append(lambda kind, obj: heard.append((kind, obj["metadata"]["name"])))

    def broken(kind: str, obj: dict) -> None:
        raise ValueError("a listener's bug")

    informer.listeners.append(broken)  # must not stop the cache or the listeners after it
    informer.start()
    try:
        await asyncio.wait_for(informer.synced.wait(), 5)
        kube.add(node("n1"))
        await kube.patch("Node", None, "n0", {"metadata": {"labels": {"x": "y"}}})
        await kube.delete("Node", None, "n1")
        await until(lambda: _heard(heard, 3), "three changes")
        assert heard == [("ADDED", "n1"), ("MODIFIED", "n0"), ("DELETED", "n1")]
        assert await informer.get(None, "n1") is None
    finally:
        await informer.close()


async def _heard(heard: list[tuple[str, str]], count: int) -> bool:
    return len(heard) >= count


async def test_the_cache_keeps_no_managed_fields_and_says_when_it_has_seen_a_write() -> None:
    kube = FakeKube()
    listed = node("n0")
    listed["metadata"]["managedFields"] = [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
    kube.add(listed)
    informer = Informer(kube, "Node")
    informer.start()
    try:
        assert "managedFields" not in ((await informer.get(None, "n0")) or {"metadata": {}})["metadata"]
        watched = node("n1")
        watched["metadata"]["managedFields"] = [{"manager": "kwok"}]
        written = kube.add(watched)
        # Read-your-writes: the watch delivers the write's resourceVersion ...
        assert await informer.wait_for_version(written["metadata"]["resourceVersion"], 1.0)
        cached = await informer.get(None, "n1")
        assert cached is not None and "managedFields" not in cached["metadata"]
        # ... and a version the cache has not reached (or not a number) is not waited for in vain.
        assert not await informer.wait_for_version(str(kube.version + 5), 0.05)
        assert not await informer.wait_for_version("not-a-number", 1.0)
    finally:
        await informer.close()
