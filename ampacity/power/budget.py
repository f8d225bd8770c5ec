"""What a PowerBudget declares, as the policy sees it.

The field names follow the PowerBudget spec; the controller converts the Kubernetes
object into a `BudgetSpec` so the policy never touches the API types.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Actuator(StrEnum):
    """How an agent enforces a GPU's cap.

    POWER_LIMIT sets the GPU's power limit to the cap: the GPU draws min(demand, cap), so a cap
    above what a phase draws (decoding at 380 W under a 500 W cap) saves nothing. CLOCK_LOCK
    also locks the SM clock at the clock where compute-bound work draws the cap (the power
    limit stays as the backstop): every phase's draw then scales with cap / max limit, so a
    cap saves watts on decoding too, at little cost to its speed (it is memory-bound).
    """

    POWER_LIMIT = "PowerLimit"
    CLOCK_LOCK = "ClockLock"


@dataclass(frozen=True)
class PriorityClass:
    """A workload priority class and the lowest cap the budget may impose on it.

    `rank` orders classes: higher is more important. The highest-ranked class of a budget
    is the protected tier that POLCA caps only above T2; every lower class is capped above T1.
    """

    name: str
    rank: int
    min_cap_watts: float

    def __post_init__(self) -> None:
        if self.min_cap_watts <= 0:
            raise ValueError(f"priority class {self.name!r}: min_cap_watts must be positive")


@dataclass(frozen=True)
class BudgetSpec:
    """A power budget: one breaker (`limit_watts`) shared by the GPUs of the selected nodes.

    Thresholds are fractions of the limit (POLCA's T1/T2). Caps are tightened until the
    projected power is `margin_fraction` below the threshold that triggered them, and are
    released only after power stayed `hysteresis_fraction` below that threshold for
    `hold_seconds`. Keeping margin < hysteresis is what stops the policy from flapping:
    power that was just capped sits between the two and releases nothing.
    """

    limit_watts: float
    classes: tuple[PriorityClass, ...]
    t1_fraction: float = 0.85
    t2_fraction: float = 0.95
    hysteresis_fraction: float = 0.05
    margin_fraction: float = 0.02
    hold_seconds: float = 30.0
    release_step_watts: float = 50.0
    staleness_seconds: float = 30.0
    safe_cap_watts: float | None = None
    #: How a cap is enforced, which decides what the policy expects a cap to save.
    actuator: Actuator = Actuator.POWER_LIMIT

    def __post_init__(self) -> None:
        if self.limit_watts <= 0:
            raise ValueError("limit_watts must be positive")
        if not 0 < self.t1_fraction < self.t2_fraction <= 1:
            raise ValueError("thresholds must satisfy 0 < t1_fraction < t2_fraction <= 1")
        if not 0 <= self.margin_fraction < self.hysteresis_fraction < self.t1_fraction:
            raise ValueError("need 0 <= margin_fraction < hysteresis_fraction < t1_fraction")
        if not self.classes:
            raise ValueError("a budget needs at least one priority class")
        if len({c.name for c in self.classes}) != len(self.classes):
            raise ValueError("priority class names must be unique")
        if self.hold_seconds < 0 or self.release_step_watts <= 0 or self.staleness_seconds <= 0:
            raise ValueError("hold_seconds >= 0, release_step_watts > 0 and staleness_seconds > 0")
        if self.safe_cap_watts is not None and self.safe_cap_watts <= 0:
            raise ValueError("safe_cap_watts must be positive")

    @property
    def t1_watts(self) -> float:
        return self.t1_fraction * self.limit_watts

    @property
    def t2_watts(self) -> float:
        return self.t2_fraction * self.limit_watts

    @property
    def top_rank(self) -> int:
        """Rank of the protected tier (capped only above T2)."""
        return max(c.rank for c in self.classes)

    def priority_class(self, name: str) -> PriorityClass:
        """The class called `name`; unknown names fall to the lowest class.

        A GPU whose pods carry no known priority is capped first: for a breaker, treating
        an unknown workload as expendable is the safe side.
        """
        for c in self.classes:
            if c.name == name:
                return c
        return min(self.classes, key=lambda c: c.rank)
