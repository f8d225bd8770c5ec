"""The GPU catalogue: one entry per product, keyed by the GPU Feature Discovery product label.

GFD writes the NVML device name with spaces as dashes into `nvidia.com/gpu.product`
(`NVIDIA H100 80GB HBM3` -> `NVIDIA-H100-80GB-HBM3`); a ServingPool's `gpuType` may give that
label or a short name (`h100`). Figures are the vendors' datasheets, dense (no sparsity) BF16
tensor FLOP/s, so the serving latency model, the fake nodes of the local cluster and the power
model all read the same numbers:

- NVIDIA A100 Tensor Core GPU datasheet (SXM4 40/80 GB, PCIe 80 GB);
- NVIDIA H100 Tensor Core GPU datasheet (SXM5, PCIe), NVIDIA H200 datasheet (SXM);
- NVIDIA HGX B200 datasheet (per GPU: 2.25 PFLOP/s dense BF16, 180 GB, 7.7 TB/s);
- NVIDIA L40S and L4 datasheets (PCIe cards without NVLink);
- AMD Instinct MI300X datasheet (OAM; 1307.4 TFLOP/s dense BF16, 192 GB HBM3, 5.3 TB/s).

`interconnect_bandwidth` is what one GPU sends per direction to its tensor-parallel peers: half
the bidirectional NVLink (or Infinity Fabric) figure, or PCIe x16 per direction where a card has
no GPU-to-GPU fabric (an NVLink bridge pairs only two PCIe cards, so TP above 2 crosses PCIe).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class GpuProduct:
    """One GPU product, as its datasheet gives it."""

    product: str
    """GPU Feature Discovery's `nvidia.com/gpu.product` label (AMD: the device's marketing name)."""
    short_name: str
    """Ampacity's short type (`ampacity.dev/gpu-type`), unique in the catalogue."""
    peak_flops: float
    """Dense BF16 tensor FLOP/s."""
    hbm_bandwidth: float
    """Memory bytes/s."""
    memory_bytes: int
    interconnect_bandwidth: float
    """GPU-to-GPU bytes/s per direction (see the module docstring)."""
    interconnect: str
    max_power_watts: float
    """The board's maximum power (TDP): the top of its settable limit range."""
    calibrated_like: str
    """The short name of the calibrated GPU whose latency efficiencies this one borrows (itself
    when it is calibrated): the nearest architecture among the profiled ones."""
    reported_memory_mib: int | None = None
    """What NVML (and so GFD's `nvidia.com/gpu.memory` label) reports, where known to differ
    from the datasheet's figure."""

    @property
    def memory_mib(self) -> int:
        """GFD's `nvidia.com/gpu.memory` label (MiB)."""
        return self.reported_memory_mib or self.memory_bytes // 2**20


CATALOGUE: tuple[GpuProduct, ...] = (
    GpuProduct("NVIDIA-A100-SXM4-80GB", "a100", 312e12, 2.039e12, 80 * GIB, 300e9, "NVLink 3", 400, "a100"),
    GpuProduct(
        "NVIDIA-A100-SXM4-40GB", "a100-40gb", 312e12, 1.555e12, 40 * GIB, 300e9, "NVLink 3", 400, "a100"
    ),
    GpuProduct("NVIDIA-A100-80GB-PCIe", "a100-pcie", 312e12, 1.935e12, 80 * GIB, 32e9, "PCIe 4", 300, "a100"),
    GpuProduct(
        "NVIDIA-H100-80GB-HBM3", "h100", 989e12, 3.35e12, 80 * GIB, 450e9, "NVLink 4", 700, "h100", 81559
    ),
    GpuProduct("NVIDIA-H100-PCIe", "h100-pcie", 756e12, 2.0e12, 80 * GIB, 64e9, "PCIe 5", 350, "h100"),
    GpuProduct("NVIDIA-H200", "h200", 989e12, 4.8e12, 141 * 10**9, 450e9, "NVLink 4", 700, "h100", 143771),
    GpuProduct("NVIDIA-B200", "b200", 2.25e15, 7.7e12, 180 * 10**9, 900e9, "NVLink 5", 1000, "h100"),
    GpuProduct("NVIDIA-L40S", "l40s", 362e12, 864e9, 48 * GIB, 32e9, "PCIe 4", 350, "h100"),
    GpuProduct("NVIDIA-L4", "l4", 121e12, 300e9, 24 * GIB, 32e9, "PCIe 4", 72, "h100"),
    GpuProduct(
        "AMD-Instinct-MI300X", "mi300x", 1307.4e12, 5.3e12, 192 * GIB, 448e9, "Infinity Fabric", 750, "h100"
    ),
)

#: The GPUs whose latency efficiencies are fitted on measured profiles (Splitwise's perf_model.csv).
CALIBRATED = frozenset({"a100", "h100"})

_BY_NAME = {key.lower(): p for p in CATALOGUE for key in (p.product, p.short_name)}
# Labels GFD writes for the same parts under other NVML names, and common spellings.
_ALIASES = {
    "a100-80gb": "a100",
    "h100-80gb": "h100",
    "h100-sxm": "h100",
    "nvidia-h100-sxm5-80gb": "h100",
    "h200-141gb": "h200",
    "nvidia-h200-141gb-hbm3e": "h200",
    "nvidia-a100-pcie-80gb": "a100-pcie",
    "mi300x": "mi300x",
}


def gpu_product(name: str) -> GpuProduct:
    """A product by GFD label (`NVIDIA-H100-80GB-HBM3`) or short name (`h100`), any case."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _BY_NAME:
        known = ", ".join(f"{p.short_name} ({p.product})" for p in CATALOGUE)
        raise KeyError(f"unknown GPU {name!r}; known: {known}")
    return _BY_NAME[key]


def known_gpu_names() -> list[str]:
    """Every accepted spelling: short names first, then product labels."""
    return [p.short_name for p in CATALOGUE] + [p.product for p in CATALOGUE]
