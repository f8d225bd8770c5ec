"""The simulated GPU backend the node agent uses when there is no GPU."""

from __future__ import annotations

import pytest

from agents.gpu import GpuBackend, NvmlBackend, SimulatedGpuBackend
from ampacity.power.gpu_model import A100_SXM


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_reports_like_a_gpu() -> None:
    # Both backends satisfy the protocol (mypy checks these two assignments).
    backend: GpuBackend = SimulatedGpuBackend(gpus=4, clock=FakeClock())
    nvml: type[GpuBackend] = NvmlBackend
    assert nvml.__name__ == "NvmlBackend"
    assert backend.device_count() == 4
    assert backend.power_watts(0) == 75  # idle H100
    assert backend.power_limit_watts(0) == 700
    assert backend.limit_range_watts(0) == (200, 700)


def test_power_follows_load_and_cap() -> None:
    gpu = SimulatedGpuBackend(gpus=1, clock=FakeClock())
    gpu.set_load(0, prompt_busy=1.0)
    assert gpu.power_watts(0) == 700
    gpu.set_power_limit_watts(0, 450)
    assert gpu.power_watts(0) == 450
    assert gpu.demand_watts(0) == 700
    assert gpu.throughput_fraction(0) < 1.0
    gpu.set_load(0, token_busy=1.0)
    assert gpu.power_watts(0) == 380  # decoding draws less than the cap
    assert gpu.throughput_fraction(0) == 1.0  # and is not slowed by it


def test_energy_integrates_power_over_the_injected_clock() -> None:
    clock = FakeClock()
    gpu = SimulatedGpuBackend(gpus=2, spec=A100_SXM, clock=clock)
    clock.now = 10.0  # 10 s idle at 63 W
    gpu.set_load(0, prompt_busy=1.0)
    clock.now = 20.0  # 10 s at 400 W
    gpu.set_power_limit_watts(0, 300)
    clock.now = 25.0  # 5 s at 300 W
    assert gpu.energy_joules(0) == pytest.approx(10 * 63 + 10 * 400 + 5 * 300)
    assert gpu.energy_joules(1) == pytest.approx(25 * 63)
    assert gpu.energy_joules(0) == gpu.energy_joules(0)  # reading does not add energy


def test_rejects_what_nvml_would_reject() -> None:
    clock = FakeClock()
    gpu = SimulatedGpuBackend(gpus=1, clock=clock)
    with pytest.raises(ValueError):
        gpu.set_power_limit_watts(0, 150)  # below the H100's 200 W minimum
    with pytest.raises(ValueError):
        gpu.set_load(0, prompt_busy=0.7, token_busy=0.5)
    clock.now = -1.0
    with pytest.raises(ValueError, match="backwards"):
        gpu.energy_joules(0)
