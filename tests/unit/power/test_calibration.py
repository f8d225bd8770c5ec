"""The GPU model's calibration against the Zeus and Splitwise measurements."""

from __future__ import annotations

import numpy as np
import pytest

from ampacity.data import data_dir
from ampacity.power.calibration import CapPoint, fit_cap_curve, load_zeus_points, splitwise_h100_llama70b

pytestmark = pytest.mark.skipif(
    not (data_dir() / "zeus").exists() or not (data_dir() / "splitwise").exists(),
    reason="public traces not present (set AMPACITY_DATA)",
)


@pytest.fixture(scope="module")
def points() -> list[CapPoint]:
    return load_zeus_points()


def test_zeus_points_cover_both_gpus_and_are_normalised(points: list[CapPoint]) -> None:
    assert {p.gpu for p in points} == {"v100", "a40"}
    assert len({(p.gpu, p.job) for p in points}) == 121
    assert all(0 < p.cap_fraction <= 1 for p in points)


def test_curve_is_monotone_and_anchored(points: list[CapPoint]) -> None:
    curve = fit_cap_curve(points)
    grid = np.linspace(0, 1, 201)
    values = curve(grid)
    assert np.all(np.diff(values) >= 0)
    assert curve.at(1.0) == 1.0 and curve.at(0.0) == 0.0
    assert curve.at(1.5) == 1.0  # a cap above the draw costs nothing


def test_curve_matches_zeus_within_measured_tolerance(points: list[CapPoint]) -> None:
    """Measured on the fit: per-bin medians lie within 0.07 of the curve (the monotone fit
    pools two adjacent bins around 0.45), and the median point within 0.02; the p90 error
    (0.11) is job-to-job spread in Zeus, not bias."""
    curve = fit_cap_curve(points)
    x = np.array([p.cap_fraction for p in points])
    y = np.array([p.throughput_fraction for p in points])
    residual = curve(x) - y
    assert np.median(np.abs(residual)) < 0.025
    for low in np.arange(0.35, 1.0, 0.05):
        members = (x >= low) & (x < low + 0.05)
        if members.sum() >= 10:
            assert abs(np.median(residual[members])) < 0.07, low


def test_curve_has_the_dvfs_shape(points: list[CapPoint]) -> None:
    """Cheap at the top, expensive at the bottom: 80 % of the draw keeps > 90 % of the
    throughput, 50 % of the draw keeps well under 80 %."""
    curve = fit_cap_curve(points)
    assert curve.at(0.8) > 0.9
    assert curve.at(0.5) < 0.8


def test_splitwise_profile_is_plausible_for_llama70b_on_8_h100() -> None:
    profile = splitwise_h100_llama70b()
    assert 8_000 < 1 / profile.seconds_per_prompt_token < 14_000  # prompt tokens per second
    tpot = profile.time_per_output_token([1, 8, 64, 128])
    assert 0.025 < tpot[0] < 0.035
    assert np.all(np.diff(tpot) > 0)
    assert tpot[3] == pytest.approx(2 * tpot[2])  # saturated beyond the profiled batches
