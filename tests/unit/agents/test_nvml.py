"""`NvmlBackend` against a fake `pynvml` that records calls and fails with the real errors.

The fake keeps the real module's error classes and constants (`pynvml.NVMLError(code)`
becomes `NVMLError_NoPermission` and so on, exactly as the binding raises them) and
replaces only the functions, which work in milliwatts like NVML itself.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pynvml
import pytest

from agents.gpu import GpuError, NvmlBackend, release


@dataclass
class Device:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    limit_mw: int = 700_000
    default_mw: int = 700_000
    min_mw: int = 200_000
    max_mw: int = 700_000
    power_mw: int = 350_000
    energy_mj: int = 5_000_000
    sm_mhz: int = 1980
    graphics_clocks: tuple[int, ...] = (1980, 1755, 1410, 1005, 345)
    locked: tuple[int, int] | None = None


@dataclass
class FakeNvml:
    """Devices plus a log of calls; `fail[function] = NVML_ERROR_*` makes a call raise."""

    devices: list[Device]
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)

    def module(self) -> types.ModuleType:
        fake = types.ModuleType("pynvml")
        for name in dir(pynvml):
            if name.startswith(("NVMLError", "NVML_")):
                setattr(fake, name, getattr(pynvml, name))
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(fake, name, self._recorded(name, getattr(self, name)))
        return fake

    def _recorded(self, name: str, function: Any) -> Any:
        def call(*args: Any) -> Any:
            self.calls.append((name, *args))
            if name in self.fail:
                raise pynvml.NVMLError(self.fail[name])
            return function(*args)

        return call

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]

    # The NVML functions the backend calls; a handle is the Device itself.
    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Device:
        return self.devices[index]

    def nvmlDeviceGetUUID(self, d: Device) -> str:
        return d.uuid

    def nvmlDeviceGetName(self, d: Device) -> str:
        return d.name

    def nvmlDeviceGetPowerManagementLimitConstraints(self, d: Device) -> list[int]:
        return [d.min_mw, d.max_mw]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, d: Device) -> int:
        return d.default_mw

    def nvmlDeviceGetPowerManagementLimit(self, d: Device) -> int:
        return d.limit_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, d: Device) -> int:
        return d.limit_mw

    def nvmlDeviceGetPowerUsage(self, d: Device) -> int:
        return min(d.power_mw, d.limit_mw)

    def nvmlDeviceGetTotalEnergyConsumption(self, d: Device) -> int:
        return d.energy_mj

    def nvmlDeviceGetClockInfo(self, d: Device, clock_type: int) -> int:
        assert clock_type == pynvml.NVML_CLOCK_SM
        return d.locked[1] if d.locked else d.sm_mhz

    def nvmlDeviceGetSupportedMemoryClocks(self, d: Device) -> list[int]:
        return [2619, 1593]

    def nvmlDeviceGetSupportedGraphicsClocks(self, d: Device, memory_mhz: int) -> list[int]:
        assert memory_mhz == 2619
        return list(d.graphics_clocks)

    def nvmlDeviceSetPowerManagementLimit(self, d: Device, limit_mw: int) -> None:
        if not d.min_mw <= limit_mw <= d.max_mw:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        d.limit_mw = limit_mw

    def nvmlDeviceSetGpuLockedClocks(self, d: Device, low: int, high: int) -> None:
        d.locked = (low, high)

    def nvmlDeviceResetGpuLockedClocks(self, d: Device) -> None:
        d.locked = None


UUIDS = ("GPU-aaaaaaaa-0000-4000-8000-000000000000", "GPU-bbbbbbbb-0000-4000-8000-000000000001")


def make(**device: Any) -> tuple[NvmlBackend, FakeNvml]:
    fake = FakeNvml([Device(UUIDS[0], **device), Device(UUIDS[1])])
    return NvmlBackend(fake.module()), fake


def test_reads_every_gpu_by_uuid_in_watts_and_joules() -> None:
    backend, fake = make(limit_mw=600_000, default_mw=650_000)
    gpus = backend.gpus()
    assert [g.uuid for g in gpus] == list(UUIDS)
    first = gpus[0]
    assert (first.index, first.model) == (0, "NVIDIA H100 80GB HBM3")
    assert (first.min_limit_watts, first.max_limit_watts) == (200.0, 700.0)
    assert (first.default_limit_watts, first.initial_limit_watts) == (650.0, 600.0)
    assert (first.min_clock_mhz, first.max_clock_mhz) == (345, 1980)
    reading = backend.read(UUIDS[0])
    assert reading.power_watts == 350.0
    assert reading.energy_joules == 5000.0
    assert reading.limit_watts == 600.0
    assert reading.clock_mhz == 1980
    assert len(fake.named("nvmlInit")) == 1


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "LibraryNotFound"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "DriverNotLoaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "NoPermission"),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "LibRmVersionMismatch"),
        (pynvml.NVML_ERROR_UNKNOWN, "Unknown"),
    ],
)
def test_nvml_that_cannot_start_is_a_named_error(code: int, name: str) -> None:
    fake = FakeNvml([Device(UUIDS[0])], fail={"nvmlInit": code})
    with pytest.raises(GpuError) as raised:
        NvmlBackend(fake.module())
    assert raised.value.code == name
    assert raised.value.reason == f"Nvml{name}"
    assert "nvmlInit" in str(raised.value)


def test_a_failing_scan_shuts_nvml_down_again() -> None:
    fake = FakeNvml([Device(UUIDS[0])], fail={"nvmlDeviceGetUUID": pynvml.NVML_ERROR_GPU_IS_LOST})
    with pytest.raises(GpuError) as raised:
        NvmlBackend(fake.module())
    assert raised.value.code == "GpuIsLost" and raised.value.gone
    assert fake.named("nvmlShutdown")


def test_no_python_binding_is_a_named_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # what an image without nvidia-ml-py has
    with pytest.raises(GpuError) as raised:
        NvmlBackend()
    assert raised.value.code == "BindingNotInstalled"


def test_sets_limits_in_milliwatts() -> None:
    backend, fake = make()
    backend.set_power_limit(UUIDS[1], 412.5)
    assert fake.named("nvmlDeviceSetPowerManagementLimit")[-1][2] == 412_500
    assert backend.read(UUIDS[1]).limit_watts == 412.5


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (pynvml.NVML_ERROR_NO_PERMISSION, "NoPermission"),
        (pynvml.NVML_ERROR_NOT_SUPPORTED, "NotSupported"),
        (pynvml.NVML_ERROR_INVALID_ARGUMENT, "InvalidArgument"),
        (pynvml.NVML_ERROR_GPU_IS_LOST, "GpuIsLost"),
        (pynvml.NVML_ERROR_UNINITIALIZED, "Uninitialized"),
    ],
)
def test_a_refused_limit_is_a_named_error_and_changes_nothing(code: int, name: str) -> None:
    backend, fake = make()
    fake.fail["nvmlDeviceSetPowerManagementLimit"] = code
    with pytest.raises(GpuError) as raised:
        backend.set_power_limit(UUIDS[0], 300)
    assert raised.value.code == name and raised.value.uuid == UUIDS[0]
    assert backend.read(UUIDS[0]).limit_watts == 700.0


def test_out_of_range_limit_is_refused_by_nvml() -> None:
    backend, _ = make()
    with pytest.raises(GpuError) as raised:
        backend.set_power_limit(UUIDS[0], 100)
    assert raised.value.code == "InvalidArgument"


def test_release_restores_the_limit_found_at_start_not_the_maximum() -> None:
    backend, fake = make(limit_mw=550_000, default_mw=650_000)
    gpu = backend.gpus()[0]
    backend.set_power_limit(gpu.uuid, 300)
    backend.lock_clocks(gpu.uuid, 1410)
    release(backend, gpu)
    assert backend.read(gpu.uuid).limit_watts == 550.0
    assert fake.devices[0].locked is None
    assert fake.named("nvmlDeviceResetGpuLockedClocks")


def test_release_falls_back_to_the_default_when_the_start_limit_is_out_of_range() -> None:
    # The driver let an administrator leave a limit the constraints no longer allow.
    backend, _ = make(limit_mw=150_000, default_mw=650_000)
    gpu = backend.gpus()[0]
    release(backend, gpu)
    assert backend.read(gpu.uuid).limit_watts == 650.0


def test_a_gpu_without_an_energy_counter_or_clock_reading_still_reads() -> None:
    backend, fake = make()
    fake.fail["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    fake.fail["nvmlDeviceGetClockInfo"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    reading = backend.read(UUIDS[0])
    assert reading.energy_joules is None and reading.clock_mhz is None
    assert reading.power_watts == 350.0


@pytest.mark.parametrize(
    "function",
    [
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetTotalEnergyConsumption",
        "nvmlDeviceGetClockInfo",
    ],
)
def test_a_lost_gpu_reads_as_gone(function: str) -> None:
    backend, fake = make()
    fake.fail[function] = pynvml.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(GpuError) as raised:
        backend.read(UUIDS[0])
    assert raised.value.gone and raised.value.call == function


def test_a_read_timeout_is_not_mistaken_for_a_lost_gpu() -> None:
    backend, fake = make()
    fake.fail["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_TIMEOUT
    with pytest.raises(GpuError) as raised:
        backend.read(UUIDS[0])
    assert raised.value.code == "Timeout" and not raised.value.gone


def test_clock_locking_sets_the_floor_and_the_ceiling_and_resets() -> None:
    backend, fake = make()
    backend.lock_clocks(UUIDS[0], 1410)
    assert fake.named("nvmlDeviceSetGpuLockedClocks")[-1][2:] == (345, 1410)
    assert backend.read(UUIDS[0]).clock_mhz == 1410
    backend.reset_clocks(UUIDS[0])
    assert fake.devices[0].locked is None


def test_a_gpu_that_lists_no_clocks_cannot_be_locked() -> None:
    fake = FakeNvml(
        [Device(UUIDS[0])], fail={"nvmlDeviceGetSupportedMemoryClocks": pynvml.NVML_ERROR_NOT_SUPPORTED}
    )
    backend = NvmlBackend(fake.module())
    assert backend.gpus()[0].max_clock_mhz is None
    with pytest.raises(GpuError) as raised:
        backend.lock_clocks(UUIDS[0], 1410)
    assert raised.value.code == "NotSupported"
    assert not fake.named("nvmlDeviceSetGpuLockedClocks")


@pytest.mark.parametrize(
    ("code", "name"),
    [(pynvml.NVML_ERROR_NO_PERMISSION, "NoPermission"), (pynvml.NVML_ERROR_NOT_SUPPORTED, "NotSupported")],
)
def test_refused_clock_locks_are_named_errors(code: int, name: str) -> None:
    backend, fake = make()
    fake.fail["nvmlDeviceSetGpuLockedClocks"] = code
    fake.fail["nvmlDeviceResetGpuLockedClocks"] = code
    for attempt in (lambda: backend.lock_clocks(UUIDS[0], 1005), lambda: backend.reset_clocks(UUIDS[0])):
        with pytest.raises(GpuError) as raised:
            attempt()
        assert raised.value.code == name


def test_a_gpu_that_falls_off_the_bus_leaves_the_list() -> None:
    backend, fake = make(limit_mw=600_000)
    first = backend.gpus()[0]
    del fake.devices[0]  # the remaining GPU is now index 0
    gpus = backend.gpus()
    assert [g.uuid for g in gpus] == [UUIDS[1]]
    assert gpus[0].index == 0
    with pytest.raises(GpuError) as raised:
        backend.read(first.uuid)
    assert raised.value.gone


def test_an_error_code_the_binding_does_not_know_is_still_reported() -> None:
    backend, fake = make()
    fake.fail["nvmlDeviceGetPowerUsage"] = 4242
    with pytest.raises(GpuError) as raised:
        backend.read(UUIDS[0])
    assert raised.value.code == "Error4242"


def test_shutdown_errors_are_swallowed() -> None:
    backend, fake = make()
    fake.fail["nvmlShutdown"] = pynvml.NVML_ERROR_UNINITIALIZED
    backend.close()
    assert fake.named("nvmlShutdown")
