from __future__ import annotations

import numpy as np
import pytest

from ampacity.serving.hardware import gpu, model
from ampacity.serving.latency import (
    CALIBRATION,
    LatencyModel,
    Profile,
    fit_calibration,
    load_profiles,
    nnls,
    profiling_artifacts,
    relative_errors,
)

# What the pinned calibration achieves on perf_model.csv (302 prefill and decode measurements):
# median 10.1%, p90 20.4%. The test fails if a change to the model makes it worse.
MEDIAN_ERROR_BOUND = 0.102
P90_ERROR_BOUND = 0.205


@pytest.fixture(scope="module")
def profiles(traces_present: None) -> list[Profile]:
    return load_profiles()


def test_error_against_splitwise_profiles(profiles: list[Profile]) -> None:
    errors = relative_errors(profiles)
    assert len(errors) == 302
    assert np.median(errors) <= MEDIAN_ERROR_BOUND
    assert np.percentile(errors, 90) <= P90_ERROR_BOUND


def test_pinned_calibration_is_what_the_fit_gives(profiles: list[Profile]) -> None:
    refit = fit_calibration(profiles)
    for p in profiles:
        pinned = LatencyModel(model(p.model), gpu(p.gpu), p.tp)
        fitted = LatencyModel(model(p.model), gpu(p.gpu), p.tp, refit[p.gpu])
        tokens, squares, context = p.prompt * p.batch, p.prompt**2 * p.batch, p.prompt * p.batch
        assert pinned.prefill_time(tokens, squares) == pytest.approx(
            fitted.prefill_time(tokens, squares), rel=0.01
        )
        assert pinned.decode_time(p.batch, context) == pytest.approx(
            fitted.decode_time(p.batch, context), rel=0.01
        )


def test_artifacts_are_the_impossible_rows(profiles: list[Profile]) -> None:
    artifacts = profiling_artifacts(profiles)
    assert {(p.model, p.tp, p.batch) for p in artifacts} == {("llama2-70b", 2, 64)}


@pytest.mark.parametrize("gpu_name", sorted(CALIBRATION))
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_roofline_is_a_lower_bound(gpu_name: str, tp: int) -> None:
    spec, hw = model("llama3-8b"), gpu(gpu_name)
    lm = LatencyModel(spec, hw, tp)
    assert lm.decode_time(1, 0) >= spec.weight_bytes / (tp * hw.hbm_bandwidth)
    assert lm.prefill_time(4096, 4096**2) >= 2 * spec.params * 4096 / (tp * hw.peak_flops)


def test_latency_grows_with_work_and_shrinks_with_tp() -> None:
    spec, hw = model("llama2-70b"), gpu("h100")
    lm = LatencyModel(spec, hw, 4)
    assert lm.prefill_time(2048, 2048**2) > lm.prefill_time(1024, 1024**2)
    assert lm.decode_time(64, 64_000) > lm.decode_time(8, 8_000)
    # A mixed pass costs more than either of its parts: the interference colocation pays.
    assert lm.mixed_time(2048, 2048**2, 32, 32_000) > lm.prefill_time(2048, 2048**2)
    assert lm.mixed_time(2048, 2048**2, 32, 32_000) > lm.decode_time(32, 32_000)
    assert LatencyModel(spec, hw, 8).prefill_time(8192, 8192**2) < LatencyModel(spec, hw, 2).prefill_time(
        8192, 8192**2
    )


def test_kv_capacity_counts_what_the_weights_leave() -> None:
    spec, hw = model("llama2-70b"), gpu("h100")
    assert LatencyModel(spec, hw, 1).kv_capacity_tokens() == 0  # 138 GB of weights on one 80 GB GPU
    tp2, tp4 = LatencyModel(spec, hw, 2).kv_capacity_tokens(), LatencyModel(spec, hw, 4).kv_capacity_tokens()
    assert 0 < tp2 < tp4
    # GQA: 8 KV heads of 128 over 80 layers, K and V, 2 bytes each.
    assert spec.kv_bytes_per_token == 2 * 80 * 1024 * 2


def test_nnls_clamps_at_zero() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([2.0, -1.0, 1.0])  # unconstrained optimum has a negative second weight
    x = nnls(a, b)
    assert np.all(x >= 0)
    assert x[1] == 0
    assert x[0] == pytest.approx(1.5)
    assert nnls(a, a @ np.array([0.5, 2.0])) == pytest.approx([0.5, 2.0])
