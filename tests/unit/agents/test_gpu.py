"""The simulated GPU backend the node agent uses with `--simulate`."""

from __future__ import annotations

import pytest

from agents.gpu import GpuBackend, GpuError, NvmlBackend, SimulatedFaults, SimulatedGpuBackend
from ampacity.power.gpu_model import A100_SXM


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def power(gpu: SimulatedGpuBackend, index: int) -> float:
    return gpu.read(gpu.uuid(index)).power_watts


def test_reports_like_a_gpu() -> None:
    # Both backends satisfy the protocol (mypy checks these two assignments).
    backend: GpuBackend = SimulatedGpuBackend(gpus=4, clock=FakeClock())
    nvml: type[GpuBackend] = NvmlBackend
    assert nvml.name == "nvml" and backend.name == "simulated"
    gpus = backend.gpus()
    assert len(gpus) == 4 and len({g.uuid for g in gpus}) == 4
    assert all(g.uuid.startswith("GPU-") for g in gpus)
    assert (gpus[0].min_limit_watts, gpus[0].max_limit_watts, gpus[0].initial_limit_watts) == (200, 700, 700)
    reading = backend.read(gpus[0].uuid)
    assert reading.power_watts == 75  # idle H100
    assert reading.limit_watts == 700


def test_power_follows_load_cap_and_clock_lock() -> None:
    gpu = SimulatedGpuBackend(gpus=1, clock=FakeClock())
    uuid = gpu.uuid(0)
    gpu.set_load(0, prompt_busy=1.0)
    assert power(gpu, 0) == 700
    gpu.set_power_limit(uuid, 450)
    assert power(gpu, 0) == 450
    assert gpu.demand_watts(0) == 700
    assert gpu.throughput_fraction(0) < 1.0
    gpu.set_load(0, token_busy=1.0)
    assert power(gpu, 0) == 380  # decoding draws less than the cap
    assert gpu.throughput_fraction(0) == 1.0  # and is not slowed by it
    # A clock lock does bind on decoding: it draws less and, above the knee, runs as fast.
    gpu.lock_clocks(uuid, 1400)
    assert power(gpu, 0) < 300
    assert gpu.throughput_fraction(0) == 1.0
    assert gpu.read(uuid).clock_mhz == 1400
    gpu.reset_clocks(uuid)
    assert power(gpu, 0) == 380


def test_energy_integrates_power_over_the_injected_clock() -> None:
    clock = FakeClock()
    gpu = SimulatedGpuBackend(gpus=2, spec=A100_SXM, clock=clock)
    clock.now = 10.0  # 10 s idle at 63 W
    gpu.set_load(0, prompt_busy=1.0)
    clock.now = 20.0  # 10 s at 400 W
    gpu.set_power_limit(gpu.uuid(0), 300)
    clock.now = 25.0  # 5 s at 300 W
    assert gpu.read(gpu.uuid(0)).energy_joules == pytest.approx(10 * 63 + 10 * 400 + 5 * 300)
    assert gpu.read(gpu.uuid(1)).energy_joules == pytest.approx(25 * 63)


def test_rejects_what_nvml_would_reject() -> None:
    clock = FakeClock()
    gpu = SimulatedGpuBackend(gpus=1, clock=clock)
    with pytest.raises(GpuError) as raised:
        gpu.set_power_limit(gpu.uuid(0), 150)  # below the H100's 200 W minimum
    assert raised.value.code == "InvalidArgument"
    with pytest.raises(ValueError):
        gpu.set_load(0, prompt_busy=0.7, token_busy=0.5)
    clock.now = -1.0
    with pytest.raises(ValueError, match="backwards"):
        gpu.read(gpu.uuid(0))


def test_told_faults_fail_like_nvml() -> None:
    gpu = SimulatedGpuBackend(gpus=1, clock=FakeClock())
    gpu.faults = SimulatedFaults(set_limit="NoPermission")
    with pytest.raises(GpuError) as raised:
        gpu.set_power_limit(gpu.uuid(0), 300)
    assert raised.value.reason == "NvmlNoPermission"
    assert gpu.read(gpu.uuid(0)).limit_watts == 700
    gpu.faults = SimulatedFaults(library="LibraryNotFound")
    with pytest.raises(GpuError) as raised:
        gpu.gpus()
    assert raised.value.code == "LibraryNotFound"
    gpu.faults = SimulatedFaults()
    uuid = gpu.uuid(0)
    gpu.remove(0)
    assert gpu.gpus() == []
    with pytest.raises(GpuError) as raised:
        gpu.read(uuid)
    assert raised.value.gone
