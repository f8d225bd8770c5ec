"""GPU and model specifications that the roofline latency model is built on.

Datasheet figures only; everything measured (efficiencies, overheads) lives in `latency.py`'s
calibration. Only A100 and H100 are listed because those are the GPUs the Splitwise profiles
(`splitwise/perf_model.csv`) calibrate; adding a GPU without profiles would silently reuse another
GPU's efficiencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

GIB = 2**30

_T = TypeVar("_T")


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator, as the latency model sees it."""

    name: str
    peak_flops: float
    """Dense BF16/FP16 tensor-core FLOP/s (no sparsity)."""
    hbm_bandwidth: float
    """HBM bytes/s."""
    memory_bytes: int
    nvlink_bandwidth: float
    """NVLink bytes/s per GPU and per direction (half the bidirectional datasheet figure)."""


@dataclass(frozen=True)
class ModelSpec:
    """A dense decoder-only transformer served in 16-bit weights and KV cache."""

    name: str
    params: float
    layers: int
    hidden: int
    kv_dim: int
    """Width of K (and of V) per layer: KV heads x head dim; smaller than `hidden` under GQA."""
    bytes_per_value: int = 2

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_value

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer: what one token adds to the KV cache."""
        return 2 * self.layers * self.kv_dim * self.bytes_per_value


# NVIDIA A100 SXM4 80GB and H100 SXM5 80GB datasheets.
GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec(
        "a100", peak_flops=312e12, hbm_bandwidth=2.039e12, memory_bytes=80 * GIB, nvlink_bandwidth=300e9
    ),
    "h100": GpuSpec(
        "h100", peak_flops=989e12, hbm_bandwidth=3.35e12, memory_bytes=80 * GIB, nvlink_bandwidth=450e9
    ),
}

# Architectures from the models' published configs. llama2-70b and bloom-176b are the two models
# the Splitwise profiles cover; the Llama 3 entries reuse the per-GPU calibration (the roofline
# features carry the model-specific part), so their latencies are extrapolations.
MODELS: dict[str, ModelSpec] = {
    "llama2-70b": ModelSpec("llama2-70b", params=68.98e9, layers=80, hidden=8192, kv_dim=8 * 128),
    "bloom-176b": ModelSpec("bloom-176b", params=176.2e9, layers=70, hidden=14336, kv_dim=14336),
    "llama3-8b": ModelSpec("llama3-8b", params=8.03e9, layers=32, hidden=4096, kv_dim=8 * 128),
    "llama3-70b": ModelSpec("llama3-70b", params=70.55e9, layers=80, hidden=8192, kv_dim=8 * 128),
}


def _lookup(table: dict[str, _T], name: str, what: str) -> _T:
    key = name.lower().removesuffix("-80gb")
    if key not in table:
        raise KeyError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}")
    return table[key]


def gpu(name: str) -> GpuSpec:
    """A GPU by name (`h100`, `H100-80GB`, ...)."""
    return _lookup(GPUS, name, "GPU")


def model(name: str) -> ModelSpec:
    """A model by name (`llama2-70b`, ...)."""
    return _lookup(MODELS, name, "model")
