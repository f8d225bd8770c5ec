"""Building blocks shared by every Ampacity kind: the base model, conditions and status.

Field names are snake_case in Python and camelCase on the wire, as Kubernetes
expects; `ApiModel` does the aliasing so both the CRD schema and the objects
read back from the API server use the Kubernetes spelling.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

GROUP = "ampacity.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: Labels and annotations the operator writes all live under this prefix.
LABEL_PREFIX = GROUP


@dataclass(frozen=True)
class Rule:
    """One CEL rule for `x-kubernetes-validations`, and the same rule in Python.

    The API server checks `rule` on admission; `check` (given the parsed model) lets the
    operator refuse, with the same message, an object admitted before the rule existed.
    """

    rule: str
    message: str
    field_path: str | None = None
    check: Callable[[Any], bool] | None = None

    def schema(self) -> dict[str, str]:
        validation = {"rule": self.rule, "message": self.message}
        if self.field_path:
            validation["fieldPath"] = self.field_path
        return validation


def cel(
    rule: str, message: str, field_path: str | None = None, check: Callable[[Any], bool] | None = None
) -> Rule:
    """One CEL rule, checked by the API server on admission and (with `check`) by the operator."""
    return Rule(rule, message, field_path, check)


class ApiModel(BaseModel):
    """Base of every spec and status model: camelCase on the wire, unknown fields ignored.

    Unknown fields are ignored rather than rejected because the API server
    already prunes them; a reconciler must tolerate objects written by a newer
    version of the schema instead of crash-looping on them.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        use_enum_values=True,
        validate_default=True,
    )

    #: CEL rules for this object, emitted as `x-kubernetes-validations`.
    validations: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(handler(core_schema))
        if cls.validations:
            schema["x-kubernetes-validations"] = [rule.schema() for rule in cls.validations]
        return schema

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        for rule in self.validations:
            if rule.check is not None and not rule.check(self):
                raise PydanticCustomError("rule", rule.message)
        return self

    def to_api(self) -> dict[str, Any]:
        """The object as the API server stores it (camelCase, unset optionals omitted)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A Kubernetes-style condition (the same shape as `metav1.Condition`)."""

    type: str = Field(description="Type of the condition, e.g. Ready, Planned, Degraded.", max_length=316)
    status: ConditionStatus = Field(description="Status of the condition: True, False or Unknown.")
    reason: str = Field(
        description="Machine-readable CamelCase reason for the last transition.",
        max_length=1024,
    )
    message: str = Field(default="", description="Human-readable details about the last transition.")
    observed_generation: int = Field(
        default=0, ge=0, description="The .metadata.generation the condition was computed from."
    )
    last_transition_time: datetime = Field(
        description="When the condition last changed status (RFC 3339).",
    )


class Status(ApiModel):
    """The part every status shares: observed generation and conditions."""

    observed_generation: int = Field(
        default=0, ge=0, description="The .metadata.generation the operator last reconciled."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Current state of the object, one entry per condition type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def set_condition(
        self,
        type_: str,
        status: ConditionStatus | Literal["True", "False", "Unknown"],
        reason: str,
        message: str,
        generation: int,
        now: datetime | None = None,
    ) -> None:
        """Set a condition; the transition time moves only when the status changes."""
        status = ConditionStatus(status)
        previous = self.condition(type_)
        changed = previous is None or previous.status != status
        new = Condition(
            type=type_,
            status=status,
            reason=reason,
            message=message,
            observed_generation=generation,
            last_transition_time=(now or datetime.now(UTC))
            if changed or previous is None
            else previous.last_transition_time,
        )
        self.conditions = [c for c in self.conditions if c.type != type_] + [new]


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")


def parse_duration(value: object) -> float:
    """Seconds from a Go-style duration string ("1s", "250ms", "1h30m") or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not re.fullmatch(_DURATION_PATTERN, value):
        raise ValueError(f"{value!r} is not a duration such as 500ms, 30s, 10m or 1h30m")
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(value))


def format_duration(seconds: float) -> str:
    """The shortest exact duration string for a number of seconds (0.1 -> "100ms")."""
    if seconds < 1 or seconds != int(seconds):
        return f"{round(seconds * 1000, 3):g}ms"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n}{u}" for n, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if n]
    return "".join(parts) or "0s"


#: A duration: a string such as "500ms" or "1h" on the wire, seconds (float) in Python.
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": _DURATION_PATTERN}),
]


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise PydanticCustomError("positive_duration", "must be greater than zero, e.g. 500ms or 30s")
    return seconds


#: A duration that must be greater than zero (a staleness bound, a deadline, an interval);
#: the API server checks it with CEL, the operator with the same rule in Python.
PositiveDuration = Annotated[
    float,
    BeforeValidator(parse_duration),
    AfterValidator(_positive),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": _DURATION_PATTERN,
            "x-kubernetes-validations": [
                cel(
                    "duration(self) > duration('0s')", "must be greater than zero, e.g. 500ms or 30s"
                ).schema()
            ],
        }
    ),
]

#: A DNS-1035 label, what a Service name must be: lowercase letters, digits and '-', starting
#: with a letter and ending with a letter or digit.
DNS_LABEL_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
#: A DNS-1123 label (container, volume and host names): may also start with a digit.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: Kubernetes' limit on a label, and so on a Service, a hostname or a label value.
LABEL_MAX = 63


class NameLimit(BaseModel):
    """What the names of a kind's objects must be, because its children are named after them.

    The API server accepts any DNS subdomain (253 characters) as a custom object's name, but
    a child such as the Service `<name>-prefill` must fit a 63-character DNS label. The CRD
    checks these rules at the root of the object (where CEL may read `metadata.name`), and
    `problems` checks the same in Python for objects created before the rules existed.
    """

    model_config = ConfigDict(frozen=True)

    #: The longest name whose children still fit.
    max_length: int
    #: Why, in words, for the error message: which child names the limit comes from.
    because: str
    #: Whether the name also names a Service, so it must be a DNS-1035 label.
    names_a_service: bool = True

    def validations(self) -> tuple[Rule, ...]:
        """The rules on the object's name; each rule's `check` takes the name."""
        rules = [
            cel(
                f"self.metadata.name.size() <= {self.max_length}",
                f"metadata.name must be at most {self.max_length} characters: {self.because}",
                check=lambda name: len(name) <= self.max_length,
            )
        ]
        if self.names_a_service:
            rules.append(
                cel(
                    f"self.metadata.name.matches('{DNS_LABEL_1035}')",
                    "metadata.name must start with a letter and hold only lowercase letters, digits "
                    "and '-' (no '.'), because it also names a Service",
                    check=lambda name: re.fullmatch(DNS_LABEL_1035, name) is not None,
                )
            )
        return tuple(rules)

    def problems(self, name: str) -> list[str]:
        """The messages of the rules `name` breaks (the same as the API server's)."""
        return [rule.message for rule in self.validations() if rule.check and not rule.check(name)]
