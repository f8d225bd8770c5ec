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

Clock locking (`nvmlDeviceSetGpuLockedClocks`) is modelled from the same Zeus curve: under a
power cap the firmware lowers the SM clock until the draw fits, and compute-bound work runs
at the clock, so the curve read backwards says what a compute-bound phase draws at a clock
fraction c: the cap fraction x with zeus(x) = c. We assume the same power-versus-clock
relation for the token phase (the silicon is the same), but the token phase is
memory-bound: it keeps full speed down to `TOKEN_CLOCK_KNEE` of the top clock and slows in
proportion below it. The knee and the token phase's power-versus-clock are extrapolated
(neither Zeus nor Splitwise measured clocks); the compute-bound relation is calibrated.
The clock range is what NVML lists for the SXM parts (H100 345-1980 MHz, A100 210-1410).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ampacity.api.gpu_products import gpu_product
from ampacity.power.calibration import CapCurve, FloatArray, zeus_cap_curve

#: `calibration.zeus_cap_curve()` as fitted on the Zeus data (a unit test keeps the two equal),
#: so the operator and the agents, which ship without the traces, can use it for clock locks.
ZEUS_CAP_CURVE = CapCurve(
    knots_x=(
        0.0,
        0.374256,
        0.439347,
        0.467887,
        0.531450,
        0.564486,
        0.622826,
        0.665694,
        0.729607,
        0.774620,
        0.829923,
        0.882016,
        0.927909,
        0.985321,
        1.0,
    ),
    knots_y=(
        0.0,
        0.247785,
        0.446837,
        0.446837,
        0.633848,
        0.680852,
        0.729146,
        0.823289,
        0.850363,
        0.899680,
        0.938424,
        0.938424,
        0.968683,
        0.976012,
        1.0,
    ),
)


@dataclass(frozen=True)
class GpuSpec:
    """Per-phase power and settable limit range of one GPU model."""

    name: str
    idle_watts: float
    prompt_watts: float
    token_watts: float
    min_limit_watts: float
    max_limit_watts: float
    min_clock_mhz: int = 345
    max_clock_mhz: int = 1980

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
    min_clock_mhz=210,
    max_clock_mhz=1410,
)
GPU_SPECS = {spec.name: spec for spec in (H100_SXM, A100_SXM)}


#: Fraction of the top SM clock below which decoding (memory-bound) starts to slow (extrapolated).
TOKEN_CLOCK_KNEE = 0.6


def clock_power_fraction(clock_fraction: npt.ArrayLike) -> FloatArray:
    """Fraction of a phase's uncapped draw it draws with its SM clock locked at
    `clock_fraction` of the top clock: the Zeus cap curve read backwards."""
    curve = ZEUS_CAP_CURVE
    c = np.clip(np.asarray(clock_fraction, dtype=np.float64), 0.0, 1.0)
    # The curve is non-decreasing with flat stretches; interpolate on its strictly rising knots.
    xs, ys = [0.0], [0.0]
    for x, y in zip(curve.knots_x[1:], curve.knots_y[1:], strict=True):
        if y > ys[-1]:
            xs.append(x)
            ys.append(y)
    return np.interp(c, ys, xs)


def clock_fraction_for_cap(cap_fraction: float) -> float:
    """The SM clock (fraction of the top clock) at which compute-bound work draws
    `cap_fraction` of its uncapped power: the clock lock that enforces a cap on any phase."""
    return ZEUS_CAP_CURVE.at(cap_fraction)


def phase_watts(spec: GpuSpec, watts: float, clock_mhz: float | None) -> float:
    """A phase's uncapped draw at a clock lock (None: unlocked), never below idle."""
    if clock_mhz is None:
        return watts
    fraction = float(clock_power_fraction(clock_mhz / spec.max_clock_mhz))
    return max(spec.idle_watts, watts * fraction)


def speed_at_clock(spec: GpuSpec, clock_mhz: float, compute_bound: bool) -> float:
    """Throughput fraction of a phase with the SM clock locked at `clock_mhz`."""
    c = min(1.0, max(0.0, clock_mhz / spec.max_clock_mhz))
    return c if compute_bound else min(1.0, c / TOKEN_CLOCK_KNEE)


def demand_watts(
    spec: GpuSpec, prompt_busy: npt.ArrayLike, token_busy: npt.ArrayLike, clock_mhz: float | None = None
) -> FloatArray:
    """Uncapped draw when the GPU spends `prompt_busy` of its time on prompts and
    `token_busy` on decoding (fractions, summing to at most 1; the rest is idle), with the
    SM clock locked at `clock_mhz` (None: unlocked)."""
    p = np.clip(np.asarray(prompt_busy, dtype=np.float64), 0.0, 1.0)
    t = np.clip(np.asarray(token_busy, dtype=np.float64), 0.0, 1.0 - p)
    prompt = phase_watts(spec, spec.prompt_watts, clock_mhz)
    token = phase_watts(spec, spec.token_watts, clock_mhz)
    return spec.idle_watts + p * (prompt - spec.idle_watts) + t * (token - spec.idle_watts)


def drawn_watts(demand: npt.ArrayLike, cap: npt.ArrayLike) -> FloatArray:
    """Power actually drawn under a cap."""
    return np.minimum(np.asarray(demand, dtype=np.float64), np.asarray(cap, dtype=np.float64))


def speed(phase_watts: npt.ArrayLike, cap: npt.ArrayLike) -> FloatArray:
    """Throughput fraction (1 = uncapped) of work whose uncapped draw is `phase_watts`."""
    fraction = np.asarray(cap, dtype=np.float64) / np.asarray(phase_watts, dtype=np.float64)
    return zeus_cap_curve()(np.minimum(fraction, 1.0))
