"""NodePower: one per GPU node, the meeting point of the operator and the node's power agent.

The operator writes `spec` (the caps its PowerBudget assigned to the node's GPUs, and
what the agent must do when that assignment goes stale); the node agent writes `status`
(per-GPU power, limits and energy, and whether it fell back to the safe cap). The object
is named after its node and owned by the Node, so deleting a node deletes it. A
ValidatingAdmissionPolicy in the Helm chart lets an agent write only its own node's object.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from ampacity.api.meta import ApiModel, PositiveDuration, Status
from ampacity.api.resource import Resource, age_column, ready_column, reason_column


class GpuAssignment(ApiModel):
    """The limit the operator assigned to one GPU."""

    index: int = Field(ge=0, description="NVML index of the GPU.")
    uuid: str = Field(
        default="", description="GPU UUID the assignment is for (empty: whatever GPU has the index)."
    )
    cap_watts: float = Field(gt=0, description="Power limit the agent must enforce.")
    clock_fraction: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Lock the GPU's SM clock at this fraction of its top clock (absent: unlocked).",
    )
    capped: bool = Field(default=False, description="Whether the limit is below the GPU's maximum.")
    priority: str = Field(default="", description="Power priority class the operator saw on the GPU.")


class NodePowerSpec(ApiModel):
    """The assignment, written by the operator."""

    budget: str = Field(default="", description="PowerBudget that covers the node.")
    gpus: list[GpuAssignment] = Field(
        default_factory=list,
        description="Per-GPU limits; a GPU not listed has no cap.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["index"]},
    )
    assigned_at: datetime | None = Field(
        default=None, description="When the operator last confirmed the assignment (RFC 3339)."
    )
    safe_cap_watts: float | None = Field(
        default=None, gt=0, description="Cap the agent applies on its own when the assignment is stale."
    )
    staleness: PositiveDuration = Field(
        default=10.0, description="How old assignedAt may be before the agent falls back to the safe cap."
    )


class GpuReading(ApiModel):
    """One GPU's sample."""

    index: int = Field(ge=0, description="NVML index of the GPU.")
    uuid: str = Field(default="", description="GPU UUID (NVML), the ID the kubelet gives pods.")
    model: str = Field(default="", description="GPU model name (NVML).")
    power_watts: float = Field(ge=0, description="Power draw (W).")
    energy_joules: float | None = Field(
        default=None, ge=0, description="Energy since the counter started (J); absent where the GPU has none."
    )
    limit_watts: float = Field(ge=0, description="Power limit currently enforced (W).")
    min_limit_watts: float = Field(ge=0, description="Lowest settable power limit (W).")
    max_limit_watts: float = Field(ge=0, description="Highest settable power limit (W).")
    default_limit_watts: float | None = Field(
        default=None, ge=0, description="The GPU's default power limit (W)."
    )
    clock_mhz: int | None = Field(default=None, ge=0, description="Current SM clock (MHz).")
    locked_clock_mhz: int | None = Field(
        default=None, ge=0, description="SM clock lock the agent set (MHz); absent: unlocked."
    )
    pod: str = Field(
        default="", description="namespace/name of the pod the kubelet gave this GPU (empty: none)."
    )


class PodResourcesState(StrEnum):
    """Where the GPU-to-pod map came from."""

    KUBELET = "Kubelet"
    UNAVAILABLE = "Unavailable"
    DISABLED = "Disabled"


class NodePowerStatus(Status):
    """Telemetry, written by the node agent."""

    sampled_at: datetime | None = Field(default=None, description="When the agent sampled the GPUs.")
    power_watts: float = Field(default=0, ge=0, description="Total GPU power of the node (W).")
    gpus: list[GpuReading] = Field(
        default_factory=list,
        description="Per-GPU samples.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["index"]},
    )
    failsafe: bool = Field(default=False, description="Whether the agent enforces its safe cap.")
    failsafe_reason: str = Field(default="", description="Why the agent is in fail-safe.")
    backend: str = Field(default="", description="How the agent reads GPUs: nvml or simulated.")
    enforcing: bool = Field(
        default=False, description="Whether every limit and clock lock the agent had to set took effect."
    )
    faults: list[str] = Field(
        default_factory=list, description="NVML calls that failed in the last round, in words."
    )
    attribution: PodResourcesState = Field(
        default=PodResourcesState.DISABLED,
        description="Where the per-GPU pods come from (the kubelet's pod-resources API).",
    )
    telemetry_token_hash: str = Field(
        default="",
        description=(
            "SHA-256 (hex) of the token the agent presents to the operator's telemetry endpoint "
            "(empty: it reports through this status only)."
        ),
    )


NODE_POWER = Resource(
    kind="NodePower",
    plural="nodepowers",
    scope="Cluster",
    spec=NodePowerSpec,
    status=NodePowerStatus,
    short_names=("np",),
    description="Power caps assigned to one GPU node and the telemetry its agent reports.",
    printer_columns=(
        {"name": "Budget", "type": "string", "jsonPath": ".spec.budget", "description": "PowerBudget."},
        {"name": "Power", "type": "number", "jsonPath": ".status.powerWatts", "description": "Power (W)."},
        {
            "name": "Enforcing",
            "type": "boolean",
            "jsonPath": ".status.enforcing",
            "description": "Whether the agent could apply every limit it had to.",
        },
        {
            "name": "Failsafe",
            "type": "boolean",
            "jsonPath": ".status.failsafe",
            "description": "Whether the agent enforces its safe cap.",
        },
        {
            "name": "Sampled",
            "type": "date",
            "jsonPath": ".status.sampledAt",
            "description": "When the agent last reported.",
            "priority": 1,
        },
        ready_column(),
        reason_column(),
        age_column(),
    ),
)
