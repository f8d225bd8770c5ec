from __future__ import annotations

import numpy as np
import pytest

from ampacity.serving.workload import Workload, load_mooncake, load_trace, synthetic


def test_azure_conv_trace(azure: Workload) -> None:
    assert len(azure) == 19_366
    assert azure.arrivals[0] == 0
    assert np.all(np.diff(azure.arrivals) >= 0)
    assert 55 * 60 < azure.duration < 60 * 60  # 58 minutes
    assert azure.rate == pytest.approx(5.5, rel=0.02)
    assert azure.prompts.min() >= 1 and azure.outputs.min() >= 1


def test_mooncake_trace(traces_present: None) -> None:
    trace = load_mooncake()
    assert len(trace) == 3_993
    assert trace.arrivals[0] == 0
    assert np.median(trace.prompts) > 10_000  # long-context workload
    assert load_trace("mooncake").prompts.sum() == trace.prompts.sum()


def test_unknown_trace() -> None:
    with pytest.raises(KeyError, match="azure-conv"):
        load_trace("nope")


def test_at_rate_and_head(azure: Workload) -> None:
    fast = azure.head(1000).at_rate(20.0)
    assert fast.rate == pytest.approx(20.0)
    assert np.array_equal(fast.prompts, azure.prompts[:1000])


def test_synthetic_is_deterministic_and_burstiness_is_the_cv(azure: Workload) -> None:
    a = synthetic(20_000, 4.0, azure, burstiness=3.0, seed=7)
    b = synthetic(20_000, 4.0, azure, burstiness=3.0, seed=7)
    assert np.array_equal(a.arrivals, b.arrivals) and np.array_equal(a.prompts, b.prompts)
    for cv in (0.5, 1.0, 3.0):
        gaps = np.diff(synthetic(20_000, 4.0, azure, burstiness=cv, seed=1).arrivals)
        assert np.std(gaps) / np.mean(gaps) == pytest.approx(cv, rel=0.1)
        assert 1 / np.mean(gaps) == pytest.approx(4.0, rel=0.1)


def test_workload_validation() -> None:
    with pytest.raises(ValueError, match="sorted"):
        Workload("x", np.array([1.0, 0.5]), np.array([1, 1]), np.array([1, 1]))
    with pytest.raises(ValueError, match="one output"):
        Workload("x", np.array([0.0]), np.array([1]), np.array([0]))


def test_thin_spreads_over_the_trace(azure: Workload) -> None:
    sample = azure.thin(1000)
    assert len(sample) == 1000
    assert sample.arrivals[0] == 0
    assert sample.duration == pytest.approx(azure.duration, rel=0.01)
    assert np.mean(sample.prompts) == pytest.approx(np.mean(azure.prompts), rel=0.05)
    assert azure.thin(10**6) is azure
