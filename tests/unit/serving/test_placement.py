from __future__ import annotations

import math
import re

import pytest

from ampacity.serving import placement
from ampacity.serving.placement import NodeCache

LLAMA = "meta-llama/Llama-2-70b-hf"
WEIGHTS = 140e9  # llama2-70b in 16 bits
KEY = placement.model_label(LLAMA).removeprefix(placement.MODEL_LABEL_PREFIX)


def test_model_label_is_a_valid_kubernetes_label_key() -> None:
    key = placement.model_label(LLAMA)
    assert key == "models.ampacity.dev/meta-llama.Llama-2-70b-hf"
    name = key.removeprefix(placement.MODEL_LABEL_PREFIX)
    assert re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?", name)
    long = placement.model_label("org/" + "x" * 100 + "-")
    assert len(long.removeprefix(placement.MODEL_LABEL_PREFIX)) == 63
    with pytest.raises(ValueError):
        placement.model_label("///")


def test_node_from_labels_reads_cache_labels_and_ignores_the_rest() -> None:
    labels = {
        placement.model_label(LLAMA): "host",
        placement.model_label("mistral"): "ssd",
        placement.model_label("bogus"): "floppy",
        "kubernetes.io/hostname": "n1",
    }
    node = placement.node_from_labels("n1", labels, free_gpus=4)
    assert node.cached == {KEY: "host", "mistral": "ssd"}
    assert node.free_gpus == 4


def test_startup_time_by_tier() -> None:
    def estimate(tier: str | None) -> placement.StartupEstimate:
        cached = {KEY: tier} if tier else {}
        return placement.startup_seconds(NodeCache("n", 8, cached), LLAMA, WEIGHTS, gpus=4, init_seconds=5.0)

    assert estimate("gpu").seconds == pytest.approx(5.0)
    assert estimate("host").seconds == pytest.approx(5.0 + 140e9 / 25e9)
    assert estimate("ssd").seconds == pytest.approx(5.0 + 140e9 / 5e9)
    remote = estimate(None)
    assert remote.tier == placement.REMOTE
    assert remote.seconds == pytest.approx(5.0 + 140e9 / 1.25e9)


def test_queueing_behind_loads_and_busy_gpus() -> None:
    busy_link = NodeCache("a", 8, {KEY: "ssd"}, queued_bytes={"ssd": 50e9})
    assert placement.startup_seconds(busy_link, LLAMA, WEIGHTS, 4).queue_seconds == pytest.approx(10.0)
    short = NodeCache("b", 2, {KEY: "host"}, gpus_free_in=45.0)
    assert placement.startup_seconds(short, LLAMA, WEIGHTS, 4).queue_seconds == 45.0
    never = NodeCache("c", 2, {KEY: "host"})
    assert math.isinf(placement.startup_seconds(never, LLAMA, WEIGHTS, 4).seconds)


def test_rank_prefers_cached_weights_and_drops_nodes_that_cannot_start() -> None:
    nodes = [
        NodeCache("remote", 8),
        NodeCache("ssd", 8, {KEY: "ssd"}),
        NodeCache("host-full", 0, {KEY: "host"}),
        NodeCache("host", 8, {KEY: "host"}),
        # DRAM hit, but behind a 60-s wait for GPUs: slower than loading from SSD now.
        NodeCache("host-busy", 0, {KEY: "host"}, gpus_free_in=60.0),
    ]
    ranked = placement.rank(nodes, LLAMA, WEIGHTS, gpus=4)
    assert [e.node for e in ranked] == ["host", "ssd", "host-busy", "remote"]


def test_affinity_weights_are_proportional_to_speed() -> None:
    estimates = [
        placement.StartupEstimate("fast", "host", 10.0, 0.0),
        placement.StartupEstimate("half", "ssd", 20.0, 0.0),
        placement.StartupEstimate("slow", "remote", 5000.0, 0.0),
    ]
    assert placement.affinity_weights(estimates) == {"fast": 100, "half": 50, "slow": 1}
    assert placement.affinity_weights([]) == {}
    many = [placement.StartupEstimate(f"n{i}", "host", 10.0 + i, 0.0) for i in range(20)]
    assert len(placement.affinity_weights(many)) == placement.MAX_TERMS


def test_preferred_affinity_terms() -> None:
    terms = placement.preferred_affinity({"b": 50, "a": 100})
    assert terms[0] == {
        "weight": 100,
        "preference": {
            "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["a"]}]
        },
    }
    assert [t["weight"] for t in terms] == [100, 50]
