"""Per-client speed estimates for the FedCompass scheduler (pure).

FedCompass (Li et al., "FedCompass: Efficient Cross-Silo Federated Learning on Heterogeneous Client
Devices Using a Computing Power-Aware Scheduler", ICLR 2024) assigns local steps from each client's
seconds per step. A device's speed drifts (thermal throttling, other tenants), so the estimate is an
exponential moving average that weights the newest measurement 0.9: it follows a real change within
one or two rounds while still damping a single noisy sample.
"""

from __future__ import annotations

from dataclasses import dataclass

NEWEST_WEIGHT = 0.9


@dataclass(frozen=True)
class SpeedEstimate:
    """A client's estimated seconds per local step and how many measurements shaped it."""

    client_id: str
    seconds_per_step: float
    samples: int = 1

    def __post_init__(self) -> None:
        if not self.seconds_per_step > 0:
            raise ValueError(f"seconds_per_step must be positive, got {self.seconds_per_step}")


def observe(
    previous: SpeedEstimate | None,
    client_id: str,
    elapsed_s: float,
    steps: int,
    newest_weight: float = NEWEST_WEIGHT,
) -> SpeedEstimate:
    """Fold one measurement (`steps` local steps took `elapsed_s`) into the estimate.

    The first measurement (or a registration benchmark) is taken as is.
    """
    if steps <= 0 or not elapsed_s > 0:
        raise ValueError(f"a measurement needs positive steps and time, got {steps} steps in {elapsed_s}s")
    if not 0 < newest_weight <= 1:
        raise ValueError(f"newest_weight must be in (0, 1], got {newest_weight}")
    sample = elapsed_s / steps
    if previous is None:
        return SpeedEstimate(client_id, sample, 1)
    if previous.client_id != client_id:
        raise ValueError(f"estimate for {previous.client_id!r} cannot absorb a sample from {client_id!r}")
    blended = newest_weight * sample + (1.0 - newest_weight) * previous.seconds_per_step
    return SpeedEstimate(client_id, blended, previous.samples + 1)
