"""PowerBudget: POLCA-style power oversubscription for a set of GPU nodes."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from ampacity.api.meta import ApiModel, Duration, NameLimit, PositiveDuration, Status, cel
from ampacity.api.resource import Resource, age_column, ready_column, reason_column


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class SelectorRequirement(ApiModel):
    """A label selector requirement (as in metav1.LabelSelectorRequirement)."""

    key: str = Field(min_length=1, description="Label key.")
    operator: SelectorOperator = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[str] = Field(default_factory=list, description="Values for In and NotIn.")

    validations = (
        cel(
            "(self.operator in ['In', 'NotIn']) == (size(self.values) > 0)",
            "values must be non-empty for In and NotIn and empty for Exists and DoesNotExist",
            ".values",
            check=lambda s: (s.operator in ("In", "NotIn")) == (len(s.values) > 0),
        ),
    )


class NodeSelector(ApiModel):
    """Which nodes the budget covers (a metav1.LabelSelector)."""

    match_labels: dict[str, str] = Field(default_factory=dict, description="Labels a node must carry.")
    match_expressions: list[SelectorRequirement] = Field(
        default_factory=list, description="Set-based requirements on node labels."
    )


class Thresholds(ApiModel):
    """POLCA's two thresholds, as fractions of the limit."""

    # Above the policy's release hysteresis (5% of the limit below a threshold), or caps never loosen.
    t1: float = Field(
        default=0.85, gt=0.05, le=1, description="Above this fraction of the limit, cap low-priority GPUs."
    )
    t2: float = Field(
        default=0.95,
        gt=0,
        le=1,
        description="Above this fraction, cap every GPU, lowest priority hardest.",
    )

    validations = (
        cel(
            "self.t1 < self.t2",
            "thresholds.t1 must be below thresholds.t2",
            ".t1",
            check=lambda s: s.t1 < s.t2,
        ),
    )


class PriorityClass(ApiModel):
    """A power priority class and the lowest cap its GPUs may be given."""

    name: str = Field(
        min_length=1,
        max_length=63,
        description="Class name; pods opt in with the label ampacity.dev/power-priority=<name>.",
    )
    priority: int = Field(description="Higher is capped later and less.")
    min_cap_watts: float = Field(gt=0, description="Lowest power cap a GPU of this class may be given.")


class CapActuator(StrEnum):
    """How agents enforce a cap."""

    POWER_LIMIT = "PowerLimit"
    CLOCK_LOCK = "ClockLock"


class PowerBudgetSpec(ApiModel):
    """Desired state of a PowerBudget."""

    node_selector: NodeSelector = Field(description="Nodes the budget covers, e.g. one row or rack.")
    limit_watts: float = Field(gt=0, description="Provisioned power of the selected nodes (the breaker).")
    oversubscription: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Planned oversubscription: how far nameplate GPU power may exceed the limit (0.3 = 30%).",
    )
    thresholds: Thresholds = Field(default_factory=lambda: Thresholds(), description="Capping thresholds.")
    priority_classes: list[PriorityClass] = Field(
        default_factory=lambda: [
            PriorityClass(name="batch", priority=0, min_cap_watts=200),
            PriorityClass(name="interactive", priority=100, min_cap_watts=400),
        ],
        min_length=1,
        description="Priority classes, from the pod label ampacity.dev/power-priority.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    default_priority_class: str = Field(
        default="batch", description="Class of GPUs whose pods carry no ampacity.dev/power-priority label."
    )
    actuator: CapActuator = Field(
        default=CapActuator.CLOCK_LOCK,
        description=(
            "ClockLock: a capped GPU's SM clock is locked where compute-bound work draws the cap, with "
            "the power limit as backstop (saves power on decoding too, which draws below most caps); "
            "PowerLimit: power limits alone."
        ),
    )
    safe_cap_watts: float = Field(
        gt=0, description="Cap a node agent applies on its own when its assignment is stale or unreachable."
    )
    telemetry_staleness: PositiveDuration = Field(
        default=10.0, description="How old telemetry or assignments may be before they are distrusted."
    )
    release_hold: Duration = Field(
        default=30.0,
        description="How long power must stay below a threshold (minus hysteresis) before caps are loosened.",
    )

    validations = (
        cel(
            "self.priorityClasses.exists(c, c.name == self.defaultPriorityClass)",
            "defaultPriorityClass must name one of priorityClasses",
            ".defaultPriorityClass",
            check=lambda s: any(c.name == s.default_priority_class for c in s.priority_classes),
        ),
    )


class CappedNode(ApiModel):
    """A node whose GPUs are capped below their maximum."""

    node: str = Field(description="Node name.")
    cap_watts: float = Field(ge=0, description="Sum of the caps on the node's GPUs.")
    since: datetime = Field(description="When the node was first capped.")


class PowerBudgetStatus(Status):
    """Observed state of a PowerBudget."""

    nodes: int = Field(default=0, ge=0, description="Nodes the budget selects.")
    gpus: int = Field(default=0, ge=0, description="GPUs on those nodes.")
    current_watts: float = Field(default=0, ge=0, description="Latest total GPU power.")
    peak_watts: float = Field(default=0, ge=0, description="Highest total GPU power seen.")
    headroom_watts: float = Field(default=0, description="Limit minus current power.")
    capped_nodes: list[CappedNode] = Field(default_factory=list, description="Nodes under a cap.")
    overruns: int = Field(default=0, ge=0, description="Times power went above the limit.")
    level: str = Field(default="Normal", description="Threshold power is above: Normal, T1 or T2.")
    capped_gpus: int = Field(default=0, ge=0, description="GPUs under a cap.")
    reporting_nodes: int = Field(default=0, ge=0, description="Nodes whose agent reported fresh telemetry.")
    failsafe_nodes: list[str] = Field(
        default_factory=list, description="Nodes whose agent enforces its safe cap on its own."
    )
    unenforced_nodes: list[str] = Field(
        default_factory=list,
        description="Nodes whose agent cannot apply caps (NVML missing or refusing); see their NodePower.",
    )
    policy_state: str = Field(
        default="", description="The capping policy's memory between rounds (JSON; operator-internal)."
    )


POWER_BUDGET = Resource(
    kind="PowerBudget",
    plural="powerbudgets",
    scope="Cluster",
    spec=PowerBudgetSpec,
    status=PowerBudgetStatus,
    short_names=("pb",),
    name_limit=NameLimit(
        max_length=63,
        because="it is the value of the ampacity.dev/powerbudget label on the NodePowers it assigns, "
        "and a label value holds at most 63 characters",
        names_a_service=False,
    ),
    description="A power limit for a set of GPU nodes, enforced by capping lowest-priority work first.",
    printer_columns=(
        {"name": "Limit", "type": "number", "jsonPath": ".spec.limitWatts", "description": "Limit (W)."},
        {"name": "Power", "type": "number", "jsonPath": ".status.currentWatts", "description": "Power (W)."},
        {"name": "Nodes", "type": "integer", "jsonPath": ".status.nodes", "description": "Nodes selected."},
        {"name": "Level", "type": "string", "jsonPath": ".status.level", "description": "Normal, T1 or T2."},
        {
            "name": "Capped",
            "type": "integer",
            "jsonPath": ".status.cappedGpus",
            "description": "GPUs under a cap.",
        },
        ready_column(),
        reason_column(),
        age_column(),
    ),
)
