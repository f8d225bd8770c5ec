"""What a node agent reports for each GPU."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class GpuId:
    """A GPU in the budget: node name and NVML index."""

    node: str
    index: int

    def __str__(self) -> str:
        return f"{self.node}/gpu{self.index}"


@dataclass(frozen=True)
class GpuTelemetry:
    """One GPU's sample, as published by its node agent.

    `limit_watts` is the power limit currently enforced on the GPU; `min_limit_watts` and
    `max_limit_watts` are the settable range (NVML's power management limit constraints,
    the max being the default/TDP limit). `priority` names the priority class of the pods
    on the GPU; `timestamp` is when the agent sampled it (seconds, same clock as `now`).
    """

    gpu: GpuId
    power_watts: float
    limit_watts: float
    min_limit_watts: float
    max_limit_watts: float
    priority: str
    timestamp: float

    def __post_init__(self) -> None:
        if not 0 < self.min_limit_watts <= self.max_limit_watts:
            raise ValueError(f"{self.gpu}: need 0 < min_limit_watts <= max_limit_watts")
        if self.power_watts < 0:
            raise ValueError(f"{self.gpu}: negative power")
