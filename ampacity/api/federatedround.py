"""FederatedRound: a run of federated learning rounds with computing-power-aware client assignment.

`rounds: N` runs N rounds on one long-lived aggregator, each starting from the model the previous
one produced; `rounds: 1` (the default) is a single round. Why a field and not a FederatedRun kind:
every round of a run shares the whole spec (selector, cohort, strategy, aggregation, aggregator),
so a parent kind would either copy it into N children or hold it and leave the children empty; one
object keeps one aggregator, one set of Secrets and one status with the per-round history.
"""

from __future__ import annotations

from datetime import datetime
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
    MULTI_KRUM = "multiKrum"


class LocalSteps(ApiModel):
    """Bounds on the local steps a client is assigned (FedCompass's Q_min and Q_max)."""

    min: int = Field(default=1, ge=1, description="Fewest local steps a client is assigned (Q_min).")
    max: int = Field(default=100, ge=1, description="Most local steps a client is assigned (Q_max).")

    validations = (cel("self.min <= self.max", "localSteps.min must not exceed localSteps.max", ".min"),)


class Aggregation(ApiModel):
    """How client updates are combined."""

    rule: AggregationRule = Field(
        default=AggregationRule.MEAN,
        description=(
            "mean (FedAvg, weighted by sample count), trimmedMean, median (coordinate-wise), krum or"
            " multiKrum (the mean of the n - f best-scored updates)."
        ),
    )
    trim_fraction: float = Field(
        default=0.1, ge=0, lt=0.5, description="Fraction trimmed from each end by trimmedMean."
    )
    byzantine_clients: int = Field(
        default=0,
        ge=0,
        description="Attackers the rule must tolerate (f): trimmed from each end, or Krum's f.",
    )
    max_update_norm: float | None = Field(
        default=None, gt=0, description="Updates whose L2 norm exceeds this are rejected; unset: no bound."
    )


class AggregatorSpec(ApiModel):
    """Where the round's aggregator keeps its state."""

    state_volume_claim: str = Field(
        default="",
        description=(
            "PersistentVolumeClaim mounted at /state: received updates and models survive the aggregator"
            " pod's rescheduling, and a model given as file:///state/... is read from it. Empty: an"
            " emptyDir, which survives container restarts only."
        ),
    )
    insecure_http: bool = Field(
        default=False,
        alias="insecureHTTP",
        description=(
            "Serve plain HTTP instead of HTTPS. Off by default: the aggregator serves TLS with a"
            " certificate for its Service, issued from the operator's CA, and clients verify it against"
            " ca.crt in the round's enrolment Secret. Turn on only where the traffic never leaves a"
            " trusted network."
        ),
    )


class FederatedRoundSpec(ApiModel):
    """Desired state of a FederatedRound."""

    model: str = Field(
        min_length=1,
        description=(
            "URI of the global model artifact the round starts from: file:///state/<path>.npz on the"
            " aggregator's state volume seeds an empty aggregator; any other URI names a model the"
            " aggregator already holds (installed with PUT /v1/model)."
        ),
    )
    client_selector: dict[str, str] = Field(
        default_factory=dict, description="Labels a registered client must carry to be selected."
    )
    rounds: int = Field(
        default=1,
        ge=1,
        le=100_000,
        description=(
            "Rounds to run, one after the other on the same aggregator; each starts from the model the"
            " previous one produced."
        ),
    )
    cohort_size: int = Field(ge=1, description="Clients selected for the round.")
    min_quorum: int = Field(ge=1, description="Updates needed for the round to aggregate.")
    deadline: Duration = Field(description="Time allowed for updates after the round starts, e.g. 10m.")
    strategy: Strategy = Field(default=Strategy.FEDCOMPASS, description="fedavg, fedcompass or fedbuff.")
    local_steps: LocalSteps = Field(default_factory=lambda: LocalSteps(), description="Local-step bounds.")
    aggregation: Aggregation = Field(
        default_factory=lambda: Aggregation(), description="How updates are combined."
    )
    aggregator: AggregatorSpec = Field(
        default_factory=lambda: AggregatorSpec(), description="The round's aggregator service."
    )

    validations = (
        cel("self.minQuorum <= self.cohortSize", "minQuorum must not exceed cohortSize", ".minQuorum"),
        cel("duration(self.deadline) > duration('0s')", "deadline must be greater than zero", ".deadline"),
        cel(
            "!has(self.aggregation) || !(self.aggregation.rule in ['krum', 'multiKrum'])"
            " || self.minQuorum > 2 * self.aggregation.byzantineClients + 2",
            "krum and multiKrum need minQuorum > 2 * byzantineClients + 2",
            ".aggregation",
        ),
        cel(
            "!has(self.aggregation) || self.aggregation.rule != 'trimmedMean'"
            " || self.minQuorum > 2 * self.aggregation.byzantineClients",
            "trimmedMean needs minQuorum > 2 * byzantineClients",
            ".aggregation",
        ),
    )


class RoundPhase(StrEnum):
    PENDING = "Pending"
    SELECTING = "Selecting"
    TRAINING = "Training"
    AGGREGATING = "Aggregating"
    COMPLETED = "Completed"
    FAILED = "Failed"


class ClientAssignment(ApiModel):
    """What one selected client was asked to do."""

    client: str = Field(description="Client id, as registered with the aggregator.")
    local_steps: int = Field(ge=1, description="Local steps assigned (FedCompass: from its speed).")
    group: int = Field(default=0, ge=0, description="FedCompass arrival group (0 for fedavg and fedbuff).")
    seconds_per_step: float = Field(
        default=0, ge=0, description="Speed estimate the assignment used; 0 when none was known."
    )


class UpdateRejection(ApiModel):
    """An update the aggregator refused, and why."""

    client: str = Field(description="Client that sent it.")
    reason: str = Field(description="Why it was refused.")


class RoundResult(ApiModel):
    """Metrics of the aggregation that ended the round."""

    model_version: int = Field(ge=0, description="Global model version the round produced.")
    updates: int = Field(default=0, ge=0, description="On-time updates aggregated.")
    late_included: int = Field(
        default=0, ge=0, description="Late updates of the previous round folded in (staleness-weighted)."
    )
    rule: str = Field(default="", description="Aggregation rule applied.")
    update_norm: float = Field(default=0, ge=0, description="L2 norm of the aggregated update.")
    total_weight: float = Field(default=0, ge=0, description="Sum of the aggregated updates' weights.")


#: Rejections kept in the status (the newest); the count is in rejectedUpdates.
MAX_REJECTIONS = 10
#: Rounds kept in status.history (the newest); completedRounds counts them all.
MAX_HISTORY = 20


class RoundProgress(ApiModel):
    """One finished round of a run."""

    round: int = Field(ge=1, description="Round number within the run, from 1.")
    round_id: str = Field(description="Id of the round at the aggregator.")
    phase: RoundPhase = Field(description="Completed or Failed.")
    model_version: int | None = Field(default=None, ge=0, description="Global model version it produced.")
    selected: int = Field(default=0, ge=0, description="Clients selected.")
    participants: int = Field(default=0, ge=0, description="Clients whose update was aggregated on time.")
    stragglers: list[str] = Field(
        default_factory=list, description="Selected clients that delivered late or not at all."
    )
    rejected_updates: int = Field(
        default=0, ge=0, description="Updates refused as malformed or unauthorised."
    )
    accuracy: float | None = Field(
        default=None, ge=0, le=1, description="Mean of the accuracies the participants reported, if any."
    )
    completion_time: datetime | None = Field(default=None, description="When the round ended.")
    message: str = Field(default="", description="How the round ended.")


class FederatedRoundStatus(Status):
    """Observed state of a FederatedRound."""

    phase: RoundPhase = Field(default=RoundPhase.PENDING, description="Lifecycle phase (of the run).")
    current_round: int = Field(default=1, ge=1, description="The round in progress (or the last one).")
    completed_rounds: int = Field(default=0, ge=0, description="Rounds that ended (completed or failed).")
    history: list[RoundProgress] = Field(
        default_factory=list, description=f"The newest {MAX_HISTORY} finished rounds of the run."
    )
    aggregator_removed: bool = Field(
        default=False, description="The run ended and its aggregator Deployment and Service were removed."
    )
    aggregator: str = Field(default="", description="URL of the round's aggregator service.")
    round_id: str = Field(default="", description="Id of the round at the aggregator.")
    selected_clients: list[str] = Field(default_factory=list, description="Clients selected for the round.")
    assignments: list[ClientAssignment] = Field(
        default_factory=list, description="Local steps assigned to each selected client."
    )
    start_time: datetime | None = Field(default=None, description="When the aggregator opened the round.")
    deadline_time: datetime | None = Field(
        default=None, description="When the round closes, delivered or not."
    )
    completion_time: datetime | None = Field(default=None, description="When the round completed or failed.")
    received_updates: int = Field(default=0, ge=0, description="Updates accepted.")
    late_updates: int = Field(
        default=0, ge=0, description="Updates that arrived after the deadline (buffered for the next round)."
    )
    rejected_updates: int = Field(default=0, ge=0, description="Updates rejected as malformed.")
    rejections: list[UpdateRejection] = Field(
        default_factory=list, description=f"The newest {MAX_REJECTIONS} rejected updates and their reasons."
    )
    result: str = Field(default="", description="URI of the aggregated model.")
    result_metrics: RoundResult | None = Field(default=None, description="Metrics of the aggregation.")


FEDERATED_ROUND = Resource(
    kind="FederatedRound",
    plural="federatedrounds",
    scope="Namespaced",
    spec=FederatedRoundSpec,
    status=FederatedRoundStatus,
    short_names=("fr",),
    description="Rounds of federated learning: client selection, local training, robust aggregation.",
    printer_columns=(
        {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy", "description": "Strategy."},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
        {
            "name": "Round",
            "type": "integer",
            "jsonPath": ".status.currentRound",
            "description": "The round in progress.",
        },
        {"name": "Rounds", "type": "integer", "jsonPath": ".spec.rounds", "description": "Rounds to run."},
        {"name": "Cohort", "type": "integer", "jsonPath": ".spec.cohortSize", "description": "Cohort size."},
        {
            "name": "Received",
            "type": "integer",
            "jsonPath": ".status.receivedUpdates",
            "description": "Updates accepted.",
        },
        {
            "name": "Late",
            "type": "integer",
            "jsonPath": ".status.lateUpdates",
            "description": "Updates after the deadline.",
            "priority": 1,
        },
        ready_column(),
        reason_column(),
        age_column(),
    ),
)
