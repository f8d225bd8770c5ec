"""GPU power backends for the node agent.

`GpuBackend` is all the agent needs from a GPU: power, energy, the enforced limit, the
settable range, and a way to set the limit. `NvmlBackend` is a thin wrapper over NVML
(nvidia-ml-py); `SimulatedGpuBackend` stands in where there is no GPU, using the
calibrated model of `ampacity.power.gpu_model`, with a load tests and demos can set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from ampacity.power.gpu_model import H100_SXM, GpuSpec, demand_watts, drawn_watts, speed


class GpuBackend(Protocol):
    """Per-GPU power readings and control, GPUs addressed by NVML index."""

    def device_count(self) -> int: ...

    def power_watts(self, index: int) -> float: ...

    def energy_joules(self, index: int) -> float:
        """Energy since the counter started (monotone; diff two reads for average power)."""
        ...

    def power_limit_watts(self, index: int) -> float:
        """The power limit currently enforced."""
        ...

    def limit_range_watts(self, index: int) -> tuple[float, float]:
        """(min, max) settable power limit."""
        ...

    def set_power_limit_watts(self, index: int, watts: float) -> None: ...


class NvmlBackend:
    """NVML through nvidia-ml-py (`pynvml`), imported on construction so that nodes without
    the package (and the simulation) never need it. Needs root or CAP_SYS_ADMIN to set limits."""

    def __init__(self) -> None:
        import pynvml

        self._nvml: Any = pynvml
        pynvml.nvmlInit()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    def close(self) -> None:
        self._nvml.nvmlShutdown()

    def device_count(self) -> int:
        return len(self._handles)

    def power_watts(self, index: int) -> float:
        return float(self._nvml.nvmlDeviceGetPowerUsage(self._handles[index])) / 1000.0  # mW

    def energy_joules(self, index: int) -> float:
        return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handles[index])) / 1000.0  # mJ

    def power_limit_watts(self, index: int) -> float:
        return float(self._nvml.nvmlDeviceGetEnforcedPowerLimit(self._handles[index])) / 1000.0  # mW

    def limit_range_watts(self, index: int) -> tuple[float, float]:
        low, high = self._nvml.nvmlDeviceGetPowerManagementLimitConstraints(self._handles[index])
        return float(low) / 1000.0, float(high) / 1000.0  # mW

    def set_power_limit_watts(self, index: int, watts: float) -> None:
        self._nvml.nvmlDeviceSetPowerManagementLimit(self._handles[index], round(watts * 1000))  # mW


class SimulatedGpuBackend:
    """GPUs that draw what the calibrated model says for their load and limit.

    Energy integrates power exactly between changes: power is constant while neither the
    load nor the limit changes, so the counter advances on every read and before every
    change. `clock` (seconds, monotone) is injectable so tests control time.
    """

    def __init__(
        self, gpus: int = 8, spec: GpuSpec = H100_SXM, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if gpus < 1:
            raise ValueError("need at least one GPU")
        self.spec = spec
        self._clock = clock
        self._limit = [spec.max_limit_watts] * gpus
        self._load = [(0.0, 0.0)] * gpus
        self._energy = [0.0] * gpus
        self._last = clock()

    def device_count(self) -> int:
        return len(self._limit)

    def set_load(self, index: int, prompt_busy: float = 0.0, token_busy: float = 0.0) -> None:
        """Fractions of time the GPU spends in prompt (compute-bound, also training) and token
        (memory-bound) work; the rest it idles."""
        if not (0 <= prompt_busy <= 1 and 0 <= token_busy <= 1 - prompt_busy):
            raise ValueError("need 0 <= prompt_busy, token_busy and prompt_busy + token_busy <= 1")
        self._advance()
        self._load[index] = (prompt_busy, token_busy)

    def demand_watts(self, index: int) -> float:
        """What the GPU would draw with no cap."""
        return float(demand_watts(self.spec, *self._load[index]))

    def power_watts(self, index: int) -> float:
        return float(drawn_watts(self.demand_watts(index), self._limit[index]))

    def energy_joules(self, index: int) -> float:
        self._advance()
        return self._energy[index]

    def power_limit_watts(self, index: int) -> float:
        return self._limit[index]

    def limit_range_watts(self, index: int) -> tuple[float, float]:
        return self.spec.min_limit_watts, self.spec.max_limit_watts

    def set_power_limit_watts(self, index: int, watts: float) -> None:
        low, high = self.limit_range_watts(index)
        if not low <= watts <= high:
            # NVML refuses out-of-range limits too (NVML_ERROR_INVALID_ARGUMENT).
            raise ValueError(f"limit {watts} W outside [{low}, {high}] W")
        self._advance()
        self._limit[index] = float(watts)

    def throughput_fraction(self, index: int) -> float:
        """Speed of the current work under the current limit (1 = uncapped), weighting each
        phase by its share of busy time."""
        prompt, token = self._load[index]
        if prompt + token == 0:
            return 1.0
        limit = self._limit[index]
        weighted = prompt * float(speed(self.spec.prompt_watts, limit)) + token * float(
            speed(self.spec.token_watts, limit)
        )
        return weighted / (prompt + token)

    def _advance(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        if elapsed < 0:
            raise ValueError("clock went backwards")
        for i in range(len(self._limit)):
            self._energy[i] += self.power_watts(i) * elapsed
        self._last = now
