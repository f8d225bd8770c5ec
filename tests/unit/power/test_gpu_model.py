"""Power and speed of the simulated GPU under a cap."""

from __future__ import annotations

import numpy as np
import pytest

from ampacity.power.calibration import zeus_cap_curve
from ampacity.power.gpu_model import (
    A100_SXM,
    H100_SXM,
    ZEUS_CAP_CURVE,
    clock_fraction_for_cap,
    demand_watts,
    drawn_watts,
    phase_watts,
    speed,
    speed_at_clock,
)


def test_demand_follows_the_splitwise_phase_powers() -> None:
    assert demand_watts(H100_SXM, 0, 0) == 75
    assert demand_watts(H100_SXM, 1, 0) == 700
    assert demand_watts(H100_SXM, 0, 1) == 380
    assert demand_watts(A100_SXM, 0.5, 0.5) == (400 + 250) / 2
    # Token share beyond what the prompt share leaves is clipped.
    assert demand_watts(H100_SXM, 1, 1) == 700


def test_cap_limits_the_draw_but_not_below_demand() -> None:
    assert list(drawn_watts([700, 380, 75], 500)) == [500, 380, 75]


def test_cap_slows_the_prompt_phase_but_not_decoding_above_its_power() -> None:
    assert speed(H100_SXM.token_watts, 500) == 1.0
    prompt = speed(H100_SXM.prompt_watts, np.array([700, 600, 500, 350]))
    assert prompt[0] == 1.0
    assert np.all(np.diff(prompt) < 0)
    assert 0.5 < prompt[3] < 0.8


def test_the_shipped_cap_curve_is_the_one_fitted_on_zeus() -> None:
    fitted = zeus_cap_curve()
    assert np.allclose(ZEUS_CAP_CURVE.knots_x, fitted.knots_x, atol=1e-6)
    assert np.allclose(ZEUS_CAP_CURVE.knots_y, fitted.knots_y, atol=1e-6)


def test_a_clock_lock_scales_every_phase_and_slows_decoding_only_below_the_knee() -> None:
    # Locked at the clock that holds compute-bound work to a 500 W cap, prompts draw 500 W...
    fraction = clock_fraction_for_cap(500 / 700)
    clock = fraction * H100_SXM.max_clock_mhz
    assert phase_watts(H100_SXM, 700, clock) == pytest.approx(500, abs=2)
    # ... and decoding draws less than the 380 W a 500 W power limit would have left it.
    assert phase_watts(H100_SXM, 380, clock) < 300
    assert speed_at_clock(H100_SXM, clock, compute_bound=True) == pytest.approx(fraction)
    assert speed_at_clock(H100_SXM, clock, compute_bound=False) == 1.0
    assert speed_at_clock(H100_SXM, 0.3 * H100_SXM.max_clock_mhz, compute_bound=False) == pytest.approx(0.5)
    assert demand_watts(H100_SXM, 0, 1, clock_mhz=clock) == pytest.approx(phase_watts(H100_SXM, 380, clock))
    # Power falls with the clock, never below idle.
    watts = [phase_watts(H100_SXM, 700, mhz) for mhz in (1980, 1600, 1200, 800, 400)]
    assert watts == sorted(watts, reverse=True) and min(watts) >= H100_SXM.idle_watts
