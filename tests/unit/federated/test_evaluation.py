import dataclasses

import numpy as np
import pytest

from ampacity.federated.aggregation import Rule
from ampacity.federated.eval import evaluation

TINY = evaluation.SimConfig(
    clients=10, q_min=2, q_max=8, target_accuracy=0.6, max_time_s=5_000.0, byzantine_rounds=6
)


@pytest.fixture(scope="module")
def data() -> evaluation.FederatedData:
    return evaluation.load_federated_digits(TINY.clients, TINY.dirichlet_alpha, TINY.seed)


def test_split_covers_the_training_set_with_label_skew(data: evaluation.FederatedData) -> None:
    assert len(data.client_y) == TINY.clients
    assert all(len(y) >= 8 for y in data.client_y)
    # Digits has 1,797 images; 20% are held out for testing.
    assert len(data.test_y) == 360 and sum(len(y) for y in data.client_y) >= 1797 - 360
    # Dirichlet(0.5) skew: each client's most common label is well above the uniform 10%.
    top_share = [np.bincount(y, minlength=10).max() / len(y) for y in data.client_y]
    assert np.mean(top_share) > 0.25


def test_speeds_span_the_flash_spread() -> None:
    speeds = evaluation.client_speeds(20, 39.0, np.random.default_rng(0))
    assert speeds.min() == pytest.approx(1.0) and speeds.max() == pytest.approx(39.0)


def test_local_training_improves_accuracy(data: evaluation.FederatedData) -> None:
    x = np.concatenate(data.client_x)
    y = np.concatenate(data.client_y)
    theta = evaluation.initial_model()
    delta = evaluation.local_train(theta, x, y, 200, 32, 0.1, np.random.default_rng(0))
    assert evaluation.accuracy(theta + delta, data.test_x, data.test_y) > 0.8
    params = evaluation.model_params(theta + delta)
    np.testing.assert_array_equal(evaluation.params_vector(params), theta + delta)


def test_every_strategy_reaches_a_modest_target_deterministically(data: evaluation.FederatedData) -> None:
    runs = [
        evaluation.run_fedavg(data, TINY),
        evaluation.run_fedcompass(data, TINY),
        evaluation.run_async(data, TINY, 1),
        evaluation.run_async(data, TINY, 3),
    ]
    for run in runs:
        assert run.time_to_target_s is not None, run.method
        assert run.best_accuracy >= TINY.target_accuracy
        times = [t for t, _ in run.trace]
        assert times == sorted(times)
    again = evaluation.run_fedcompass(data, TINY)
    assert again.trace == runs[1].trace


def test_fedcompass_does_more_useful_work_than_fedavg_in_the_same_time(
    data: evaluation.FederatedData,
) -> None:
    cfg = dataclasses.replace(TINY, target_accuracy=1.01, max_time_s=3_000.0)
    fedavg = evaluation.run_fedavg(data, cfg)
    compass = evaluation.run_fedcompass(data, cfg)
    # No one waits for the slowest client, so many more global updates and local steps fit.
    assert compass.global_updates > 5 * fedavg.global_updates
    assert compass.local_steps > 2 * fedavg.local_steps


def test_attack_breaks_the_mean_and_multi_krum_resists(data: evaluation.FederatedData) -> None:
    bad = evaluation.attacker_set(TINY)
    assert len(bad) == round(0.2 * TINY.clients)
    clean = evaluation.run_fedavg(data, TINY, Rule.MEAN, frozenset(), TINY.byzantine_rounds)
    attacked_mean = evaluation.run_fedavg(data, TINY, Rule.MEAN, bad, TINY.byzantine_rounds)
    attacked_krum = evaluation.run_fedavg(data, TINY, Rule.MULTI_KRUM, bad, TINY.byzantine_rounds)
    assert attacked_mean.final_accuracy < clean.final_accuracy - 0.3
    assert attacked_krum.final_accuracy > attacked_mean.final_accuracy + 0.3
    assert attacked_krum.final_accuracy > clean.final_accuracy - 0.1


def test_the_comparison_runs_every_strategy_at_each_server_rate() -> None:
    cfg = dataclasses.replace(TINY, target_accuracy=0.5)
    results = evaluation.compare_at_rates(cfg, (0,), (1.0, 2.0))
    assert set(results) == {(0, 1.0), (0, 2.0)}
    one, two = results[(0, 1.0)], results[(0, 2.0)]
    assert one["fedavg"] == two["fedavg"] == one["fedavg_at_rate"], "plain FedAvg does not depend on the rate"
    assert all(v is not None for r in results.values() for v in r.values())
    # A larger server step moves faster on this convex model: the rate is really applied.
    assert two["fedbuff"] < one["fedbuff"] and two["fedcompass"] < one["fedcompass"]  # type: ignore[operator]
