"""GPU backends for the node agent: what it reads from a GPU and the two knobs it turns.

`GpuBackend` is all the agent needs: the GPUs it found (by UUID, with their settable power
range, default limit and the limit found at start), one reading per GPU (power, energy,
enforced limit, SM clock), a power limit to set, an SM clock lock to set or reset, and a way
to give a GPU back as it was found. Every failure is a `GpuError` naming NVML's error, so the
agent can say in status exactly what it could not do.

`NvmlBackend` talks to NVML through nvidia-ml-py (`pynvml`). `SimulatedGpuBackend` stands in
where there is no GPU, on the agent's `--simulate` flag only; it uses the calibrated model
of `ampacity.power.gpu_model` with a load tests and demos set, and can be told to fail the
way NVML fails (library missing, no permission) so the fail-closed paths run end to end.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from ampacity.power.gpu_model import H100_SXM, GpuSpec, demand_watts, drawn_watts, speed, speed_at_clock

#: NVML errors after which the GPU is gone from the node (fallen off the bus, reset, removed).
GONE_ERRORS = frozenset({"GpuIsLost", "GpuNotFound", "NotFound", "ResetRequired"})
#: NVML errors that say the agent may not or cannot change the setting on this GPU.
REFUSED_ERRORS = frozenset({"NoPermission", "NotSupported", "OperatingSystem", "InsufficientPower"})


class GpuError(Exception):
    """An NVML call failed. `code` is NVML's own name for the error (`NoPermission`,
    `LibraryNotFound`, ...), `call` the NVML function, `uuid` the GPU (empty: the library)."""

    def __init__(self, code: str, call: str, message: str, uuid: str = "") -> None:
        self.code, self.call, self.uuid = code, call, uuid
        where = f" on {uuid}" if uuid else ""
        super().__init__(f"{call}{where}: NVML {code} ({message})")

    @property
    def reason(self) -> str:
        """The condition reason: `Nvml` + the NVML error name, e.g. `NvmlNoPermission`."""
        return f"Nvml{self.code}"

    @property
    def gone(self) -> bool:
        return self.code in GONE_ERRORS


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as found when the backend opened (or rescanned) it."""

    index: int
    uuid: str
    model: str
    min_limit_watts: float
    max_limit_watts: float
    default_limit_watts: float
    #: The power limit the GPU had when the agent found it: what release puts back.
    initial_limit_watts: float
    #: Settable SM clock range (MHz); None where the GPU cannot lock its clocks.
    min_clock_mhz: int | None = None
    max_clock_mhz: int | None = None


@dataclass(frozen=True)
class GpuReading:
    """One GPU read in one round. `energy_joules` is None where the GPU has no energy counter."""

    power_watts: float
    energy_joules: float | None
    limit_watts: float
    clock_mhz: int | None


class GpuBackend(Protocol):
    name: str

    def gpus(self) -> list[GpuInfo]:
        """The GPUs present now (a GPU that fell off the bus is no longer listed)."""
        ...

    def read(self, uuid: str) -> GpuReading: ...

    def set_power_limit(self, uuid: str, watts: float) -> None: ...

    def lock_clocks(self, uuid: str, max_mhz: int) -> None:
        """Keep the SM clock at or below `max_mhz` (the GPU's lowest clock as the floor)."""
        ...

    def reset_clocks(self, uuid: str) -> None: ...

    def close(self) -> None: ...


def release(backend: GpuBackend, gpu: GpuInfo) -> None:
    """Give a GPU back as the agent found it: its starting limit (the default where the start
    limit was out of range) and unlocked clocks. Never the maximum: an administrator's lower
    limit, or the default below the maximum, stands."""
    target = gpu.initial_limit_watts
    if not gpu.min_limit_watts <= target <= gpu.max_limit_watts:
        target = gpu.default_limit_watts
    backend.set_power_limit(gpu.uuid, target)
    if gpu.max_clock_mhz is not None:
        backend.reset_clocks(gpu.uuid)


def _error_code(nvml: ModuleType, error: Exception) -> str:
    name = type(error).__name__
    if name.startswith("NVMLError_"):
        return name.removeprefix("NVMLError_")
    return f"Error{getattr(error, 'value', 'Unknown')}"


def _error_message(nvml: ModuleType, error: Exception) -> str:
    # NVMLError.__str__ asks the library for unknown codes, which fails with the library gone.
    known: dict[int, str] = getattr(nvml.NVMLError, "_errcode_to_string", {})
    return known.get(getattr(error, "value", -1), "unknown NVML error")


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlBackend:
    """NVML through nvidia-ml-py. `nvml` is the `pynvml` module (tests pass a recording fake
    built on the real module's error classes). Setting limits and clocks needs CAP_SYS_ADMIN
    in the container (the chart grants it); without it NVML answers NoPermission."""

    name = "nvml"

    def __init__(self, nvml: ModuleType | None = None) -> None:
        if nvml is None:
            try:
                import pynvml
            except ImportError as error:
                raise GpuError("BindingNotInstalled", "import pynvml", str(error)) from error
            nvml = pynvml
        self._nvml: Any = nvml
        self._call("nvmlInit", "")
        self._handles: dict[str, Any] = {}
        self._info: dict[str, GpuInfo] = {}
        try:
            self.rescan()
        except GpuError:
            self.close()
            raise

    def _call(self, function: str, uuid: str, *args: Any) -> Any:
        try:
            return getattr(self._nvml, function)(*args)
        except self._nvml.NVMLError as error:
            code = _error_code(self._nvml, error)
            raise GpuError(code, function, _error_message(self._nvml, error), uuid) from error

    def rescan(self) -> list[GpuInfo]:
        """Enumerate the GPUs; ones seen before keep what was found at their first scan."""
        found: dict[str, GpuInfo] = {}
        handles: dict[str, Any] = {}
        for index in range(int(self._call("nvmlDeviceGetCount", ""))):
            handle = self._call("nvmlDeviceGetHandleByIndex", "", index)
            uuid = _text(self._call("nvmlDeviceGetUUID", "", handle))
            handles[uuid] = handle
            known = self._info.get(uuid)
            found[uuid] = (
                known if known is not None and known.index == index else self._describe(index, uuid, handle)
            )
        self._handles, self._info = handles, found
        return list(found.values())

    def _describe(self, index: int, uuid: str, handle: Any) -> GpuInfo:
        low, high = self._call("nvmlDeviceGetPowerManagementLimitConstraints", uuid, handle)
        default = self._call("nvmlDeviceGetPowerManagementDefaultLimit", uuid, handle)
        current = self._call("nvmlDeviceGetPowerManagementLimit", uuid, handle)
        clocks = self._clock_range(uuid, handle)
        return GpuInfo(
            index=index,
            uuid=uuid,
            model=_text(self._call("nvmlDeviceGetName", uuid, handle)),
            min_limit_watts=low / 1000.0,  # NVML works in milliwatts
            max_limit_watts=high / 1000.0,
            default_limit_watts=default / 1000.0,
            initial_limit_watts=current / 1000.0,
            min_clock_mhz=clocks[0] if clocks else None,
            max_clock_mhz=clocks[1] if clocks else None,
        )

    def _clock_range(self, uuid: str, handle: Any) -> tuple[int, int] | None:
        """Lowest and highest SM clock the GPU supports at its top memory clock; None where
        the GPU does not list them (clock locking needs Volta or later)."""
        try:
            memory = self._call("nvmlDeviceGetSupportedMemoryClocks", uuid, handle)
            graphics = self._call("nvmlDeviceGetSupportedGraphicsClocks", uuid, handle, max(memory))
        except GpuError as error:
            if error.code in ("NotSupported", "NoPermission"):
                return None
            raise
        return (int(min(graphics)), int(max(graphics))) if graphics else None

    def gpus(self) -> list[GpuInfo]:
        if int(self._call("nvmlDeviceGetCount", "")) != len(self._handles):
            return self.rescan()
        return list(self._info.values())

    def _handle(self, uuid: str) -> Any:
        handle = self._handles.get(uuid)
        if handle is None:
            raise GpuError("NotFound", "lookup", "no such GPU", uuid)
        return handle

    def read(self, uuid: str) -> GpuReading:
        handle = self._handle(uuid)
        try:
            energy: float | None = self._call("nvmlDeviceGetTotalEnergyConsumption", uuid, handle) / 1000.0
        except GpuError as error:
            if error.code != "NotSupported":  # pre-Volta GPUs have no energy counter
                raise
            energy = None
        try:
            clock: int | None = int(
                self._call("nvmlDeviceGetClockInfo", uuid, handle, self._nvml.NVML_CLOCK_SM)
            )
        except GpuError as error:
            if error.code != "NotSupported":
                raise
            clock = None
        return GpuReading(
            power_watts=self._call("nvmlDeviceGetPowerUsage", uuid, handle) / 1000.0,
            energy_joules=energy,
            limit_watts=self._call("nvmlDeviceGetEnforcedPowerLimit", uuid, handle) / 1000.0,
            clock_mhz=clock,
        )

    def set_power_limit(self, uuid: str, watts: float) -> None:
        self._call("nvmlDeviceSetPowerManagementLimit", uuid, self._handle(uuid), round(watts * 1000))

    def lock_clocks(self, uuid: str, max_mhz: int) -> None:
        info = self._info[uuid]
        if info.min_clock_mhz is None:
            raise GpuError("NotSupported", "nvmlDeviceSetGpuLockedClocks", "no supported clock list", uuid)
        self._call("nvmlDeviceSetGpuLockedClocks", uuid, self._handle(uuid), info.min_clock_mhz, max_mhz)

    def reset_clocks(self, uuid: str) -> None:
        self._call("nvmlDeviceResetGpuLockedClocks", uuid, self._handle(uuid))

    def close(self) -> None:
        # Shutting down a library that failed is not a new failure.
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


@dataclass
class SimulatedFaults:
    """NVML failures a simulated node is told to have (NVML error names, "" for none)."""

    #: Every call fails with this (e.g. LibraryNotFound: the driver library is missing).
    library: str = ""
    #: Setting limits or clocks fails with this (e.g. NoPermission: no CAP_SYS_ADMIN).
    set_limit: str = ""


class SimulatedGpuBackend:
    """GPUs that draw what the calibrated model says for their load, limit and clock lock.

    Energy integrates power exactly between changes: power is constant while neither the
    load nor the limit changes, so the counter advances on every read and before every
    change. `clock` (seconds, monotone) is injectable so tests control time.
    """

    name = "simulated"

    def __init__(
        self, gpus: int = 8, spec: GpuSpec = H100_SXM, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if gpus < 1:
            raise ValueError("need at least one GPU")
        self.spec = spec
        self.faults = SimulatedFaults()
        self._clock = clock
        self._uuids = [f"GPU-5151{i:04d}-0000-4000-8000-{i:012d}" for i in range(gpus)]
        self._limit = [spec.max_limit_watts] * gpus
        self._locked: list[int | None] = [None] * gpus
        self._load = [(0.0, 0.0)] * gpus
        self._energy = [0.0] * gpus
        self._gone: set[int] = set()
        self._initial: dict[int, float] = {}
        self._last = clock()

    def _check(self, call: str, uuid: str = "") -> int:
        if self.faults.library:
            raise GpuError(self.faults.library, call, "simulated fault", uuid)
        if not uuid:
            return -1
        if uuid not in self._uuids:
            raise GpuError("NotFound", call, "no such GPU", uuid)
        index = self._uuids.index(uuid)
        if index in self._gone:
            raise GpuError("GpuIsLost", call, "simulated fault", uuid)
        return index

    def gpus(self) -> list[GpuInfo]:
        self._check("nvmlDeviceGetCount")
        s = self.spec
        for i in range(len(self._uuids)):  # like NVML's scan: the limit the GPU had when first seen
            self._initial.setdefault(i, self._limit[i])
        return [
            GpuInfo(
                index=i,
                uuid=uuid,
                model=s.name,
                min_limit_watts=s.min_limit_watts,
                max_limit_watts=s.max_limit_watts,
                default_limit_watts=s.max_limit_watts,
                initial_limit_watts=self._initial[i],
                min_clock_mhz=s.min_clock_mhz,
                max_clock_mhz=s.max_clock_mhz,
            )
            for i, uuid in enumerate(self._uuids)
            if i not in self._gone
        ]

    def device_count(self) -> int:
        return len(self._uuids)

    def uuid(self, index: int) -> str:
        return self._uuids[index]

    def remove(self, index: int) -> None:
        """The GPU falls off the bus: it is no longer listed and calls on it fail."""
        self._advance()
        self._gone.add(index)

    def set_load(self, index: int, prompt_busy: float = 0.0, token_busy: float = 0.0) -> None:
        """Fractions of time the GPU spends in prompt (compute-bound, also training) and token
        (memory-bound) work; the rest it idles."""
        if not (0 <= prompt_busy <= 1 and 0 <= token_busy <= 1 - prompt_busy):
            raise ValueError("need 0 <= prompt_busy, token_busy and prompt_busy + token_busy <= 1")
        self._advance()
        self._load[index] = (prompt_busy, token_busy)

    def demand_watts(self, index: int) -> float:
        """What the GPU would draw with no cap (at its clock lock, if any)."""
        return float(demand_watts(self.spec, *self._load[index], clock_mhz=self._locked[index]))

    def _power(self, index: int) -> float:
        return float(drawn_watts(self.demand_watts(index), self._limit[index]))

    def read(self, uuid: str) -> GpuReading:
        index = self._check("nvmlDeviceGetPowerUsage", uuid)
        self._advance()
        return GpuReading(
            power_watts=self._power(index),
            energy_joules=self._energy[index],
            limit_watts=self._limit[index],
            clock_mhz=self._locked[index] or self.spec.max_clock_mhz,
        )

    def set_power_limit(self, uuid: str, watts: float) -> None:
        index = self._check("nvmlDeviceSetPowerManagementLimit", uuid)
        if self.faults.set_limit:
            raise GpuError(
                self.faults.set_limit, "nvmlDeviceSetPowerManagementLimit", "simulated fault", uuid
            )
        low, high = self.spec.min_limit_watts, self.spec.max_limit_watts
        if not low <= watts <= high:
            # NVML refuses out-of-range limits the same way.
            raise GpuError("InvalidArgument", "nvmlDeviceSetPowerManagementLimit", f"{watts} W", uuid)
        self._advance()
        self._limit[index] = float(watts)

    def lock_clocks(self, uuid: str, max_mhz: int) -> None:
        index = self._check("nvmlDeviceSetGpuLockedClocks", uuid)
        if self.faults.set_limit:
            raise GpuError(self.faults.set_limit, "nvmlDeviceSetGpuLockedClocks", "simulated fault", uuid)
        if not self.spec.min_clock_mhz <= max_mhz <= self.spec.max_clock_mhz:
            raise GpuError("InvalidArgument", "nvmlDeviceSetGpuLockedClocks", f"{max_mhz} MHz", uuid)
        self._advance()
        self._locked[index] = max_mhz

    def reset_clocks(self, uuid: str) -> None:
        index = self._check("nvmlDeviceResetGpuLockedClocks", uuid)
        self._advance()
        self._locked[index] = None

    def close(self) -> None:
        pass

    def throughput_fraction(self, index: int) -> float:
        """Speed of the current work under the current limit and clock lock (1 = uncapped),
        weighting each phase by its share of busy time."""
        prompt, token = self._load[index]
        if prompt + token == 0:
            return 1.0
        limit, locked = self._limit[index], self._locked[index]
        s = self.spec

        def phase(watts: float, compute_bound: bool) -> float:
            clocked = speed_at_clock(s, locked, compute_bound) if locked is not None else 1.0
            return float(speed(watts, limit)) * clocked

        weighted = prompt * phase(s.prompt_watts, True) + token * phase(s.token_watts, False)
        return weighted / (prompt + token)

    def _advance(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        if elapsed < 0:
            raise ValueError("clock went backwards")
        for i in range(len(self._limit)):
            self._energy[i] += self._power(i) * elapsed
        self._last = now
