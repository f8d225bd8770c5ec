"""Startup-time-aware placement of a serving replica: ServerlessLLM's estimate per node.

Fu et al., "ServerlessLLM: Low-Latency Serverless Inference for Large Language Models" (OSDI 2024)
place a model on the server where it starts first, estimating for each candidate the time to get
its checkpoint into GPU memory from the fastest tier that holds it (GPU memory, host DRAM, local
SSD, or remote storage over the network), plus the time queued behind the loads already running
from that tier, plus the wait for GPUs that are busy. Weights are large (140 GB for a 70B model in
16 bits), so where they already sit decides whether a replica starts in seconds or minutes.

Node agents report what each node caches as labels, one per model:

    models.ampacity.dev/<model>=<tier>      tier: gpu | host | ssd

`node_from_labels` reads them back. The operator cannot pick a node itself (the scheduler does),
so the ranking becomes node-affinity *preferences*: `preferred_affinity` gives the
`preferredDuringSchedulingIgnoredDuringExecution` terms, weight 100 for the fastest node and less
for slower ones, in proportion to their speed (the inverse of the startup time).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MODEL_LABEL_PREFIX = "models.ampacity.dev/"
HOSTNAME_LABEL = "kubernetes.io/hostname"

# Tiers, fastest first. GPU: an idle replica's engine already holds the weights (only its
# engine has to be handed the new pool); host: DRAM, copied over PCIe; ssd: local NVMe.
GPU, HOST, SSD, REMOTE = "gpu", "host", "ssd", "remote"
TIERS = (GPU, HOST, SSD)

# Kubernetes node-affinity preference weights.
MAX_WEIGHT, MIN_WEIGHT = 100, 1
# Terms a pod spec gets at most: the scheduler scores every term on every node.
MAX_TERMS = 8

_LABEL_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def model_label(model: str) -> str:
    """The cache label key for a model: the prefix plus the model name as a valid label name.

    Label names are at most 63 characters of [A-Za-z0-9._-], starting and ending alphanumeric, so
    `meta-llama/Llama-2-70b-hf` becomes `models.ampacity.dev/meta-llama.Llama-2-70b-hf`.
    """
    name = _LABEL_NAME.sub(".", model).strip("._-")[:63].rstrip("._-")
    if not name:
        raise ValueError(f"model name {model!r} has no characters a label can keep")
    return MODEL_LABEL_PREFIX + name


@dataclass(frozen=True)
class NodeCache:
    """What a node agent reports about one node, as the estimate needs it.

    Bandwidths in bytes/s. Defaults: PCIe 4.0 x16 from pinned DRAM (~25 GB/s, what ServerlessLLM's
    loader reaches), one NVMe SSD (~5 GB/s) and a 10 Gb/s path to remote storage.
    """

    name: str
    free_gpus: int
    cached: Mapping[str, str] = field(default_factory=dict)
    """Model label name (see `model_label`) -> tier (`gpu`, `host`, `ssd`)."""
    host_bandwidth: float = 25e9
    ssd_bandwidth: float = 5e9
    network_bandwidth: float = 1.25e9
    queued_bytes: Mapping[str, float] = field(default_factory=dict)
    """Bytes of loads already running or queued per tier (`host`, `ssd`, `remote`): ServerlessLLM's
    loading queue, which a new load waits behind on the same link."""
    gpus_free_in: float = math.inf
    """Seconds until enough busy GPUs free up when `free_gpus` is short (inf: unknown, never)."""


def node_from_labels(name: str, labels: Mapping[str, str], free_gpus: int) -> NodeCache:
    """A NodeCache (default bandwidths) from a node's `models.ampacity.dev/<model>=<tier>` labels.

    Labels with an unknown tier are ignored: a load from there is estimated as remote.
    """
    cached = {
        key.removeprefix(MODEL_LABEL_PREFIX): tier
        for key, tier in labels.items()
        if key.startswith(MODEL_LABEL_PREFIX) and tier in TIERS
    }
    return NodeCache(name, free_gpus, cached)


@dataclass(frozen=True)
class StartupEstimate:
    node: str
    tier: str
    """Where the weights come from: `gpu`, `host`, `ssd` or `remote`."""
    load_seconds: float
    queue_seconds: float
    """Waiting behind other loads on the same link, and for busy GPUs."""

    @property
    def seconds(self) -> float:
        return self.load_seconds + self.queue_seconds


def startup_seconds(
    node: NodeCache, model: str, weight_bytes: float, gpus: int, init_seconds: float = 0.0
) -> StartupEstimate:
    """How long a replica of `model` (`weight_bytes`, on `gpus` GPUs) takes to start on `node`.

    `init_seconds` is what every start pays whatever the tier (engine and CUDA context start,
    graph capture). A tensor-parallel replica loads its shards in parallel, one per GPU, but they
    share the node's DRAM, SSD and NIC, so the node's bandwidth is the limit.
    """
    tier = node.cached.get(model_label(model).removeprefix(MODEL_LABEL_PREFIX), REMOTE)
    bandwidth = {GPU: math.inf, HOST: node.host_bandwidth, SSD: node.ssd_bandwidth}.get(
        tier, node.network_bandwidth
    )
    load = init_seconds + weight_bytes / bandwidth
    queued = node.queued_bytes.get(tier, 0.0) / bandwidth
    wait_gpus = 0.0 if node.free_gpus >= gpus else node.gpus_free_in
    return StartupEstimate(node.name, tier, load, max(queued, wait_gpus))


def rank(
    nodes: Iterable[NodeCache], model: str, weight_bytes: float, gpus: int, init_seconds: float = 0.0
) -> list[StartupEstimate]:
    """Every node that can start a replica at all, fastest first (ties by node name)."""
    estimates = [startup_seconds(n, model, weight_bytes, gpus, init_seconds) for n in nodes]
    return sorted((e for e in estimates if math.isfinite(e.seconds)), key=lambda e: (e.seconds, e.node))


def affinity_weights(estimates: list[StartupEstimate]) -> dict[str, int]:
    """Node -> preference weight (1..100): 100 for the fastest start, `100·fastest/t` for others.

    Proportional to the speed-up, so a node twice as slow gets half the weight and a remote load
    (minutes) next to a DRAM hit (seconds) gets the minimum; only the best `MAX_TERMS` nodes are kept.
    """
    kept = estimates[:MAX_TERMS]
    if not kept:
        return {}
    fastest = max(kept[0].seconds, 1e-9)
    return {
        e.node: max(MIN_WEIGHT, min(MAX_WEIGHT, round(MAX_WEIGHT * fastest / max(e.seconds, 1e-9))))
        for e in kept
    }


def preferred_affinity(weights: Mapping[str, int]) -> list[dict[str, Any]]:
    """`preferredDuringSchedulingIgnoredDuringExecution` terms for a pod's node affinity."""
    return [
        {
            "weight": weight,
            "preference": {"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "In", "values": [node]}]},
        }
        for node, weight in sorted(weights.items(), key=lambda item: (-item[1], item[0]))
    ]
