"""Power and speed of the simulated GPU under a cap."""

from __future__ import annotations

import numpy as np

from ampacity.power.gpu_model import A100_SXM, H100_SXM, demand_watts, drawn_watts, speed


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
