"""The simulated GPU: power drawn as a function of load and cap, and the slowdown a cap costs.

Per-phase power is Splitwise's simulator configuration (Patel et al., ISCA 2024):
H100 idle 75 W, prompt 700 W, token 380 W; A100 63/400/250 W. The settable limit range is
what NVML reports for the SXM parts (H100 200-700 W, A100 100-400 W). Training is
compute-bound like the prompt phase, so a training GPU draws the prompt-phase power.

Under a cap the GPU draws min(demand, cap) (the firmware holds it at the limit through
DVFS), and work of a phase runs at the Zeus cap curve evaluated at cap / phase power: the
token phase, at 380 W, is untouched by a 500 W cap, which is the asymmetry Splitwise and
POLCA observed (in Splitwise's profile a capped H100 is 1.30x slower on prompts and as fast
on tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ampacity.api.gpu_products import gpu_product
from ampacity.power.calibration import FloatArray, zeus_cap_curve


@dataclass(frozen=True)
class GpuSpec:
    """Per-phase power and settable limit range of one GPU model."""

    name: str
    idle_watts: float
    prompt_watts: float
    token_watts: float
    min_limit_watts: float
    max_limit_watts: float

    @property
    def training_watts(self) -> float:
        return self.prompt_watts


H100_SXM = GpuSpec(
    "h100-sxm",
    idle_watts=75.0,
    prompt_watts=700.0,
    token_watts=380.0,
    min_limit_watts=200.0,
    max_limit_watts=gpu_product("h100").max_power_watts,
)
A100_SXM = GpuSpec(
    "a100-sxm",
    idle_watts=63.0,
    prompt_watts=400.0,
    token_watts=250.0,
    min_limit_watts=100.0,
    max_limit_watts=gpu_product("a100").max_power_watts,
)
GPU_SPECS = {spec.name: spec for spec in (H100_SXM, A100_SXM)}


def demand_watts(spec: GpuSpec, prompt_busy: npt.ArrayLike, token_busy: npt.ArrayLike) -> FloatArray:
    """Uncapped draw when the GPU spends `prompt_busy` of its time on prompts and
    `token_busy` on decoding (fractions, summing to at most 1; the rest is idle)."""
    p = np.clip(np.asarray(prompt_busy, dtype=np.float64), 0.0, 1.0)
    t = np.clip(np.asarray(token_busy, dtype=np.float64), 0.0, 1.0 - p)
    return (
        spec.idle_watts + p * (spec.prompt_watts - spec.idle_watts) + t * (spec.token_watts - spec.idle_watts)
    )


def drawn_watts(demand: npt.ArrayLike, cap: npt.ArrayLike) -> FloatArray:
    """Power actually drawn under a cap."""
    return np.minimum(np.asarray(demand, dtype=np.float64), np.asarray(cap, dtype=np.float64))


def speed(phase_watts: npt.ArrayLike, cap: npt.ArrayLike) -> FloatArray:
    """Throughput fraction (1 = uncapped) of work whose uncapped draw is `phase_watts`."""
    fraction = np.asarray(cap, dtype=np.float64) / np.asarray(phase_watts, dtype=np.float64)
    return zeus_cap_curve()(np.minimum(fraction, 1.0))
