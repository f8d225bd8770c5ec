"""FederatedRound: one round of federated learning with computing-power-aware client assignment."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from ampacity.api.meta import ApiModel, Duration, Status, cel
from ampacity.api.resource import Resource, age_column, ready_column, reason_column


class Strategy(StrEnum):
    FEDAVG = "fedavg"
    FEDCOMPASS = "fedcompass"
    FEDBUFF = "fedbuff"


class AggregationRule(StrEnum):
    MEAN = "mean"
    TRIMMED_MEAN = "trimmedMean"
    MEDIAN = "median"
    KRUM = "krum"


class LocalSteps(ApiModel):
    """Bounds on the local steps a client is assigned (FedCompass's Q_min and Q_max)."""

    min: int = Field(default=1, ge=1, description="Fewest local steps a client is assigned (Q_min).")
    max: int = Field(default=100, ge=1, description="Most local steps a client is assigned (Q_max).")

    validations = (cel("self.min <= self.max", "localSteps.min must not exceed localSteps.max", ".min"),)


class Aggregation(ApiModel):
    """How client updates are combined."""

    rule: AggregationRule = Field(
        default=AggregationRule.MEAN,
        description="mean (FedAvg), trimmedMean, median (coordinate-wise) or krum.",
    )
    trim_fraction: float = Field(
        default=0.1, ge=0, lt=0.5, description="Fraction trimmed from each end by trimmedMean."
    )
    byzantine_clients: int = Field(default=0, ge=0, description="Attackers Krum must tolerate (f).")


class FederatedRoundSpec(ApiModel):
    """Desired state of a FederatedRound."""

    model: str = Field(min_length=1, description="URI of the global model artifact the round starts from.")
    client_selector: dict[str, str] = Field(
        default_factory=dict, description="Labels a registered client must carry to be selected."
    )
    cohort_size: int = Field(ge=1, description="Clients selected for the round.")
    min_quorum: int = Field(ge=1, description="Updates needed for the round to aggregate.")
    deadline: Duration = Field(description="Time allowed for updates after the round starts, e.g. 10m.")
    strategy: Strategy = Field(default=Strategy.FEDCOMPASS, description="fedavg, fedcompass or fedbuff.")
    local_steps: LocalSteps = Field(default_factory=lambda: LocalSteps(), description="Local-step bounds.")
    aggregation: Aggregation = Field(
        default_factory=lambda: Aggregation(), description="How updates are combined."
    )

    validations = (
        cel("self.minQuorum <= self.cohortSize", "minQuorum must not exceed cohortSize", ".minQuorum"),
        cel("duration(self.deadline) > duration('0s')", "deadline must be greater than zero", ".deadline"),
    )


class RoundPhase(StrEnum):
    PENDING = "Pending"
    SELECTING = "Selecting"
    TRAINING = "Training"
    AGGREGATING = "Aggregating"
    COMPLETED = "Completed"
    FAILED = "Failed"


class FederatedRoundStatus(Status):
    """Observed state of a FederatedRound."""

    phase: RoundPhase = Field(default=RoundPhase.PENDING, description="Lifecycle phase.")
    aggregator: str = Field(default="", description="URL of the round's aggregator service.")
    selected_clients: list[str] = Field(default_factory=list, description="Clients selected for the round.")
    received_updates: int = Field(default=0, ge=0, description="Updates accepted.")
    late_updates: int = Field(default=0, ge=0, description="Updates that arrived after the deadline.")
    rejected_updates: int = Field(default=0, ge=0, description="Updates rejected as malformed.")
    result: str = Field(default="", description="URI of the aggregated model.")


FEDERATED_ROUND = Resource(
    kind="FederatedRound",
    plural="federatedrounds",
    scope="Namespaced",
    spec=FederatedRoundSpec,
    status=FederatedRoundStatus,
    short_names=("fr",),
    description="A round of federated learning: client selection, local training, robust aggregation.",
    printer_columns=(
        {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy", "description": "Strategy."},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
        {"name": "Cohort", "type": "integer", "jsonPath": ".spec.cohortSize", "description": "Cohort size."},
        {
            "name": "Received",
            "type": "integer",
            "jsonPath": ".status.receivedUpdates",
            "description": "Updates accepted.",
        },
        ready_column(),
        reason_column(),
        age_column(),
    ),
)
