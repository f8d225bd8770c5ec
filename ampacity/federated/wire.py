"""The aggregator's HTTP contract: one typed home, imported by the service, the SDK and the controller.

Every body that crosses the wire is one of these models, with unknown keys refused (`extra="forbid"`),
so a misspelt key is an error at whichever side reads it instead of a silently dropped field.
Headers carry the per-upload metadata so that the body can stay the raw `.npz`.

Credentials (see `ampacity.federated.aggregator` for what each may do):

- the *admin* token: the operator's; opens and closes rounds, installs the model, revokes clients;
- the *enrolment* token: one per population (the round's Secret `<round>-aggregator-enrolment`),
  it can only enrol a client;
- a *client* token: chosen by the client itself when it enrols (the aggregator keeps its SHA-256),
  it can only act as that one client.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ampacity.federated import scheduler
from ampacity.federated.aggregation import Rule

CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_HEX = r"^[0-9a-f]{64}$"

ROUND_HEADER = "X-Ampacity-Round"
BASE_VERSION_HEADER = "X-Ampacity-Base-Version"
WEIGHT_HEADER = "X-Ampacity-Weight"
VERSION_HEADER = "X-Ampacity-Model-Version"
ELAPSED_HEADER = "X-Ampacity-Elapsed-Seconds"
STEPS_HEADER = "X-Ampacity-Local-Steps"
#: Optional on an upload: the client the sender means to upload for. It must be the token's client;
#: a mismatch is refused (403) rather than ignored, so a confused client learns about it.
CLIENT_HEADER = "X-Ampacity-Client"
#: Optional on an upload: the client's own evaluation accuracy in [0, 1] (Flower's `metrics`).
ACCURACY_HEADER = "X-Ampacity-Accuracy"

Phase = Literal["Training", "Aggregating", "Completed", "Failed"]


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClientAssignment(WireModel):
    """A selected client's assignment within a round."""

    local_steps: int = Field(default=1, ge=1)


class RoundSpec(WireModel):
    """POST /v1/rounds: what the controller sends to open a round."""

    round_id: str = Field(pattern=CLIENT_ID.pattern)
    clients: dict[str, ClientAssignment] = Field(min_length=1)
    rule: Rule = Rule.MEAN
    byzantine: int = Field(default=0, ge=0)
    trim_fraction: float = Field(default=0.0, ge=0, lt=0.5)
    min_quorum: int = Field(default=1, ge=1)
    deadline_seconds: float | None = Field(default=None, gt=0)
    max_norm: float | None = Field(default=None, gt=0)
    close_when_complete: bool = True
    staleness_exponent: float = Field(default=scheduler.DEFAULT_STALENESS_EXPONENT, gt=0)


class Rejection(WireModel):
    client_id: str
    reason: str
    #: The metric label of the refusal (`ampacity_fl_rejected_updates_total{reason}`).
    kind: str = "invalid"


class UpdateReport(WireModel):
    """What a delivering client measured: the FedCompass speed estimator's input, and its accuracy."""

    elapsed_s: float | None = None
    local_steps: float | None = None
    accuracy: float | None = None


class AggregateResult(WireModel):
    """The outcome of a round's aggregation."""

    accepted: int = Field(ge=0)
    late_included: int = Field(ge=0)
    rule: str
    update_norm: float = Field(ge=0)
    weight: float = Field(ge=0)
    version: int = Field(ge=0)
    model_file: str | None = None
    forwarded_to: str | None = None


class RoundRecord(WireModel):
    """A round as the aggregator persists and reports it: its spec, progress and outcome."""

    spec: RoundSpec
    opened_unix_s: float
    deadline_unix_s: float | None
    base_version: int
    phase: Phase = "Training"
    accepted: list[str] = Field(default_factory=list)
    rejected: list[Rejection] = Field(default_factory=list)
    late: list[str] = Field(default_factory=list)
    reports: dict[str, UpdateReport] = Field(default_factory=dict)
    result: AggregateResult | None = None
    message: str = ""


class ClientInfo(WireModel):
    """GET /v1/clients: one enrolled client, as the controller sees it (never its token)."""

    labels: dict[str, str] = Field(default_factory=dict)
    seconds_per_step: float | None = None
    revoked: bool = False


class AggregatorStatus(WireModel):
    """GET /v1/status."""

    version: int
    clients: list[str]
    round: RoundRecord | None
    late_buffered: list[str]


class EnrolRequest(WireModel):
    """POST /v1/clients: a client enrols itself (or refreshes its labels and speed).

    `token_sha256` is the SHA-256 of the bearer token the client generated for itself: the
    aggregator never sees a client's token at enrolment, only later as the bearer of its requests.
    Left out, only the admin may enrol, and the aggregator generates the token and returns it.
    """

    client_id: str = Field(pattern=CLIENT_ID.pattern)
    labels: dict[str, str] = Field(default_factory=dict)
    seconds_per_step: float | None = Field(default=None, gt=0)
    token_sha256: str | None = Field(default=None, pattern=SHA256_HEX)


class EnrolResponse(WireModel):
    client_id: str
    #: False when the client was already enrolled with this credential: it keeps its identity.
    created: bool
    #: Only when the aggregator generated the token (an admin enrolment without `token_sha256`).
    token: str | None = None


class Task(WireModel):
    """GET /v1/task: the work the aggregator assigned this client for the open round."""

    round_id: str
    model_version: int
    local_steps: int
    deadline_unix_s: float | None


class UploadAck(WireModel):
    """POST /v1/updates, 202."""

    status: Literal["accepted", "late"]
    round_id: str
    received: int | None = None
    message: str = ""


class ErrorBody(WireModel):
    """Every 4xx/5xx: the reason in words, and the refusal's kind for updates."""

    error: str
    kind: str | None = None
