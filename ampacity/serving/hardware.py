"""GPU and model specifications that the roofline latency model is built on.

GPUs come from the one catalogue, `ampacity.api.gpu_products` (datasheet figures, keyed by the GPU
Feature Discovery product label); everything measured (efficiencies, overheads) lives in
`latency.py`'s calibration, fitted on the Splitwise profiles of A100 and H100 only. Any other GPU
borrows the efficiencies of the calibrated GPU nearest its architecture and its plans say they are
extrapolated; a user's own profile replaces them (`profile_fit`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ampacity.api.gpu_products import CALIBRATED, GpuProduct, gpu_product

GIB = 2**30

_T = TypeVar("_T")


@dataclass(frozen=True)
class PhaseCoefficients:
    """Fitted weights of the five roofline terms (dimensionless, except `sync` and `layer` in s)."""

    compute: float
    memory: float
    comm: float
    sync: float
    layer: float

    def as_array(self) -> np.ndarray:
        return np.array([self.compute, self.memory, self.comm, self.sync, self.layer])


@dataclass(frozen=True)
class Calibration:
    prefill: PhaseCoefficients
    decode: PhaseCoefficients
    tp_scale: tuple[tuple[int, float, float], ...] = ()
    """(TP, prefill factor, decode factor): per-TP corrections a user profile measured (the
    five terms share one set of weights across TP degrees; a profile shows how each degree's
    kernels actually run). Unlisted TP degrees: 1."""

    def scale(self, tp: int) -> tuple[float, float]:
        return next(((p, d) for t, p, d in self.tp_scale if t == tp), (1.0, 1.0))


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
    """GPU-to-GPU bytes/s per GPU and per direction (NVLink, or PCIe on cards without it)."""
    calibrated_like: str = ""
    """The calibrated GPU whose efficiencies apply (`name` itself when calibrated)."""
    calibration: Calibration | None = None
    """Efficiencies fitted to a user's own profile; None: the pinned calibration of `calibrated_like`."""
    product: str = ""
    """GPU Feature Discovery product label."""

    @property
    def calibration_key(self) -> str:
        return self.calibrated_like or self.name

    @property
    def provenance(self) -> str:
        """Where this GPU's latency model comes from, in words."""
        if self.calibration is not None:
            return f"fitted to the user's latency profile of {self.name}"
        if self.name in CALIBRATED:
            return f"calibrated on Splitwise profiles of {self.name}"
        return (
            f"extrapolated from {self.calibration_key}: the datasheet roofline of {self.name} with "
            f"{self.calibration_key}'s calibrated efficiencies"
        )

    @property
    def provenance_kind(self) -> str:
        """Calibrated, Extrapolated or Fitted."""
        if self.calibration is not None:
            return "Fitted"
        return "Calibrated" if self.name in CALIBRATED else "Extrapolated"


def spec_of(product: GpuProduct) -> GpuSpec:
    return GpuSpec(
        product.short_name,
        peak_flops=product.peak_flops,
        hbm_bandwidth=product.hbm_bandwidth,
        memory_bytes=product.memory_bytes,
        nvlink_bandwidth=product.interconnect_bandwidth,
        calibrated_like=product.calibrated_like,
        product=product.product,
    )


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer served in 16-bit weights and KV cache, dense or mixture-of-experts."""

    name: str
    params: float
    """All parameters: what the weights take in memory."""
    layers: int
    hidden: int
    kv_dim: int
    """Width of K (and of V) per layer: KV heads x head dim; smaller than `hidden` under GQA."""
    bytes_per_value: int = 2
    active_params: float | None = None
    """Parameters one token passes through (MoE: the routed experts it uses); None: all of them."""
    attention_dim: int | None = None
    """Query heads x head dim where that differs from `hidden` (Qwen3, Gemma)."""

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_value

    @property
    def compute_params(self) -> float:
        """The parameters whose FLOPs a token costs and whose bytes a pass reads."""
        return self.active_params if self.active_params is not None else self.params

    @property
    def attention_width(self) -> int:
        return self.attention_dim if self.attention_dim is not None else self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer: what one token adds to the KV cache."""
        return 2 * self.layers * self.kv_dim * self.bytes_per_value


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
    """A GPU by GFD product label (`NVIDIA-H100-80GB-HBM3`) or short name (`h100`)."""
    return spec_of(gpu_product(name))


def model(name: str) -> ModelSpec:
    """A model by name (`llama2-70b`, ...)."""
    return _lookup(MODELS, name, "model")


# The Hugging Face `config.json` fields a ModelSpec is built from (`model_from_config`), and
# the parameter counts we add because config.json does not carry them.
ARCHITECTURE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
    "num_local_experts",
    "n_routed_experts",
    "num_experts",
    "num_experts_per_tok",
    "n_shared_experts",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "first_k_dense_replace",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "num_parameters",
)


def _experts(config: Mapping[str, Any]) -> int:
    for key in ("num_local_experts", "n_routed_experts", "num_experts"):
        if config.get(key):
            return int(config[key])
    return 0


def parameter_counts(config: Mapping[str, Any]) -> tuple[float, float]:
    """(total, active per token) parameters of a config.json architecture.

    Attention (Q, K, V, O projections), gated MLPs (three matrices), routed and shared experts
    and the router, embeddings and LM head (tied or not); norms and biases are left out (under
    0.1%). `num_parameters`, when given (from the checkpoint's safetensors index), sets the total,
    and the active count keeps the architecture's active share.
    """
    layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    vocab = int(config.get("vocab_size") or 0)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    dense_mlp = 3 * hidden * int(config.get("intermediate_size") or 4 * hidden)
    experts = _experts(config)
    if experts:
        per_token = int(config.get("num_experts_per_tok") or 1)
        expert = 3 * hidden * int(config.get("moe_intermediate_size") or config.get("intermediate_size") or 0)
        shared = int(config.get("n_shared_experts") or 0) * expert
        shared += 3 * hidden * int(config.get("shared_expert_intermediate_size") or 0)
        dense_layers = int(config.get("first_k_dense_replace") or 0)
        moe_layers = layers - dense_layers
        base = (
            embeddings
            + layers * attention
            + dense_layers * dense_mlp
            + moe_layers * (shared + hidden * experts)
        )
        total, active = base + moe_layers * experts * expert, base + moe_layers * per_token * expert
    else:
        total = active = embeddings + layers * (attention + dense_mlp)
    if config.get("num_parameters"):
        scale = float(config["num_parameters"]) / total
        return float(config["num_parameters"]), active * scale
    return float(total), float(active)


def model_from_config(name: str, config: Mapping[str, Any]) -> ModelSpec:
    """A ModelSpec from Hugging Face `config.json` fields (`ARCHITECTURE_FIELDS`).

    Multi-head latent attention (DeepSeek: `kv_lora_rank`) caches one compressed latent plus the
    rotary key per token and layer instead of K and V.
    """
    layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    if config.get("kv_lora_rank"):
        latent = int(config["kv_lora_rank"]) + int(config.get("qk_rope_head_dim") or 0)
        kv_dim = max(1, latent // 2)  # kv_bytes_per_token counts K and V: half the latent each
    else:
        kv_dim = kv_heads * head_dim
    total, active = parameter_counts(config)
    return ModelSpec(
        name,
        params=total,
        layers=layers,
        hidden=hidden,
        kv_dim=kv_dim,
        active_params=active if active < total else None,
        attention_dim=heads * head_dim if heads * head_dim != hidden else None,
    )


def architecture_block(config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a config.json that `spec.model.architecture` takes, with the parameter count.

    What `ampacity serving model-info config.json` prints: a user pastes it into the pool.
    """
    # Multimodal configs nest the language model's fields under `text_config`.
    source = {**config, **(config.get("text_config") or {})}
    block = {k: source[k] for k in ARCHITECTURE_FIELDS if source.get(k) not in (None, 0, False)}
    if "num_parameters" not in block:
        block["num_parameters"] = int(parameter_counts(source)[0])
    return block
