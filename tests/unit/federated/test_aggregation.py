import re

import numpy as np
import pytest

from ampacity.federated import aggregation
from ampacity.federated.aggregation import Rule

rng = np.random.default_rng(3)
HONEST = [np.ones(50) + 0.1 * rng.standard_normal(50) for _ in range(16)]
ATTACK = [np.full(50, 1e6) for _ in range(4)]


def distance_to_honest(result: np.ndarray) -> float:
    return float(np.linalg.norm(result - np.mean(HONEST, axis=0)))


def test_weighted_mean_uses_weights() -> None:
    out = aggregation.weighted_mean([np.zeros(3), np.ones(3)], [1.0, 3.0])
    np.testing.assert_allclose(out, 0.75)
    with pytest.raises(ValueError):
        aggregation.weighted_mean([np.zeros(3)], [-1.0])


def test_mean_is_not_robust() -> None:
    assert distance_to_honest(aggregation.aggregate(Rule.MEAN, HONEST + ATTACK)) > 1e5


@pytest.mark.parametrize("rule", [Rule.TRIMMED_MEAN, Rule.MEDIAN, Rule.KRUM, Rule.MULTI_KRUM])
def test_robust_rules_stay_within_the_honest_spread_under_f_attackers(rule: Rule) -> None:
    out = aggregation.aggregate(rule, HONEST + ATTACK, byzantine=len(ATTACK))
    honest = np.stack(HONEST)
    # Every coordinate stays inside the honest clients' range, however large the attack.
    assert np.all(out >= honest.min(axis=0) - 1e-12) and np.all(out <= honest.max(axis=0) + 1e-12)
    assert distance_to_honest(out) < 1.0


def test_trimmed_mean_without_enough_trim_is_pulled_away() -> None:
    weak = aggregation.aggregate(Rule.TRIMMED_MEAN, HONEST + ATTACK, byzantine=1)
    assert distance_to_honest(weak) > 1e5
    # A trim fraction above the attacker share restores it even with byzantine=0.
    strong = aggregation.aggregate(Rule.TRIMMED_MEAN, HONEST + ATTACK, trim_fraction=0.25)
    assert distance_to_honest(strong) < 1.0


def test_krum_picks_an_honest_update_and_multi_krum_averages_honest_ones() -> None:
    updates = HONEST + ATTACK
    scores = aggregation.krum_scores(updates, byzantine=4)
    assert int(np.argmin(scores)) < len(HONEST)
    chosen = aggregation.krum(updates, byzantine=4, select=1)
    assert any(np.array_equal(chosen, h) for h in HONEST)
    multi = aggregation.krum(updates, byzantine=4, select=16)
    np.testing.assert_allclose(multi, np.mean(HONEST, axis=0))


def test_krum_needs_more_than_2f_plus_2_updates() -> None:
    with pytest.raises(ValueError, match="2f\\+2"):
        aggregation.krum([np.zeros(2)] * 4, byzantine=1)
    assert aggregation.max_tolerated(Rule.KRUM, 20) == 8
    assert aggregation.max_tolerated(Rule.MEAN, 20) == 0


def test_flatten_roundtrip() -> None:
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([7.0, 8.0])}
    vec = aggregation.flatten(params)
    assert vec.shape == (8,)
    back = aggregation.unflatten(vec, params)
    for key in params:
        assert back[key].dtype == params[key].dtype
        np.testing.assert_array_equal(back[key], params[key])
    with pytest.raises(ValueError):
        aggregation.unflatten(np.zeros(9), params)


REF = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


@pytest.mark.parametrize(
    ("update", "max_norm", "reason"),
    [
        ({"w": np.zeros((2, 3), np.float32)}, None, "missing \\['b'\\]"),
        ({**REF, "x": np.zeros(1, np.float32)}, None, "unexpected \\['x'\\]"),
        ({**REF, "w": np.zeros((3, 2), np.float32)}, None, "shape \\[3, 2\\], expected \\[2, 3\\]"),
        ({**REF, "w": np.zeros((2, 3), np.float64)}, None, "dtype float64, expected float32"),
        ({**REF, "b": np.array([0, np.nan, 0], np.float32)}, None, "NaN or infinite"),
        ({**REF, "b": np.array([0, np.inf, 0], np.float32)}, None, "NaN or infinite"),
        ({**REF, "b": np.array([3, 4, 0], np.float32)}, 4.0, "norm 5 exceeds the limit 4"),
    ],
)
def test_validation_rejects_with_a_reason(
    update: dict[str, np.ndarray], max_norm: float | None, reason: str
) -> None:
    got = aggregation.validate_update(update, REF, max_norm)
    assert got is not None and re.search(reason, got), got


def test_validation_accepts_a_well_formed_update() -> None:
    ok = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    assert aggregation.validate_update(ok, REF, max_norm=10.0) is None
    int_ref = {"n": np.zeros(2, np.int64)}
    assert "non-float" in (aggregation.validate_update({"n": np.zeros(2, np.int64)}, int_ref) or "")
