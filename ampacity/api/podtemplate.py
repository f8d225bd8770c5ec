"""The shape of a user's pod template, as far as the operator reads it.

A kind that takes a core/v1 PodTemplateSpec (a TrainingJob's workers) keeps it as a plain
dict in Python, passed through to the pods it creates. The operator reads and extends a few
parts of it (the containers' env, resources and volume mounts, the volumes, the labels), so
those parts get a structural schema: a template with `containers: "notalist"` is refused by
the API server, not found out by a reconciler. Everything else is kept as written
(`x-kubernetes-preserve-unknown-fields`) and left for the API server to check on the pods.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler, WithJsonSchema
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from ampacity.api.meta import DNS_LABEL, LABEL_MAX, ApiModel, cel

#: A resource quantity: 1, "500m", "16Gi".
Quantity = Annotated[
    int | str,
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "description": "A resource quantity, e.g. 1, 500m or 16Gi.",
        }
    ),
]


class _Open(ApiModel):
    """A part of a core/v1 object: the fields the operator reads are checked, the rest kept."""

    model_config = ConfigDict(extra="allow")


class EnvVar(_Open):
    """An environment variable (core/v1 EnvVar)."""

    name: str = Field(min_length=1, description="Name of the variable.")


class ResourceRequirements(_Open):
    """Compute resources of a container (core/v1 ResourceRequirements)."""

    limits: dict[str, Quantity] | None = Field(default=None, description="Most a container may use.")
    requests: dict[str, Quantity] | None = Field(default=None, description="What the scheduler reserves.")


class VolumeMount(_Open):
    """A volume mounted into a container (core/v1 VolumeMount)."""

    name: str = Field(min_length=1, description="Name of the volume.")
    mount_path: str = Field(min_length=1, description="Where in the container the volume is mounted.")


class Container(_Open):
    """A container of the pod (core/v1 Container)."""

    name: str = Field(
        max_length=LABEL_MAX,
        pattern=DNS_LABEL,
        description="Container name: lowercase letters, digits and '-' (a DNS label).",
    )
    image: str = Field(min_length=1, description="Container image.")
    env: list[EnvVar] | None = Field(default=None, description="Environment variables.")
    resources: ResourceRequirements | None = Field(default=None, description="Compute resources.")
    volume_mounts: list[VolumeMount] | None = Field(default=None, description="Volumes mounted.")


class Volume(_Open):
    """A volume of the pod (core/v1 Volume)."""

    name: str = Field(
        max_length=LABEL_MAX,
        pattern=DNS_LABEL,
        description="Volume name: lowercase letters, digits and '-' (a DNS label).",
    )


#: Volumes the operator adds to every worker, so a template may not bring its own of that name.
RESERVED_VOLUMES = ("ampacity-report-token", "checkpoints")


class PodSpec(_Open):
    """The pod's spec (core/v1 PodSpec)."""

    containers: list[Container] = Field(
        min_length=1,
        description="The containers; the first one gets the GPUs.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    volumes: list[Volume] | None = Field(
        default=None,
        description="Volumes the containers may mount.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )

    validations = (
        cel(
            "!has(self.volumes) || self.volumes.all(v, !(v.name in " + str(list(RESERVED_VOLUMES)) + "))",
            f"template.spec.volumes may not be named {' or '.join(RESERVED_VOLUMES)}: "
            "the operator adds those volumes itself",
            ".volumes",
            check=lambda s: not any(v.name in RESERVED_VOLUMES for v in s.volumes or []),
        ),
    )


class TemplateMetadata(_Open):
    """Labels and annotations of the pods."""

    labels: dict[str, str] | None = Field(default=None, description="Labels added to every pod.")
    annotations: dict[str, str] | None = Field(default=None, description="Annotations added to every pod.")


class PodTemplate(_Open):
    """A core/v1 PodTemplateSpec: pod metadata and spec."""

    metadata: TemplateMetadata | None = Field(default=None, description="Labels and annotations.")
    spec: PodSpec = Field(description="The pod's spec.")


class _CheckedAs:
    """Validate a plain value against a model, but keep the value as it was.

    The operator passes a template on to the pods exactly as the user wrote it (fields the
    model does not name included), so Python keeps the dict; the model supplies the checks
    and the CRD schema.
    """

    def __init__(self, model: type[ApiModel]) -> None:
        self.model = model

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        model_schema = handler.generate_schema(self.model)
        plain = handler(source)

        def keep_input(value: Any, validate: core_schema.ValidatorFunctionWrapHandler) -> Any:
            validate(value)
            return value

        return core_schema.chain_schema(
            [plain, core_schema.no_info_wrap_validator_function(keep_input, model_schema)],
            serialization=core_schema.plain_serializer_function_ser_schema(lambda value: value),
        )

    def __get_pydantic_json_schema__(
        self, _schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(self.model.__pydantic_core_schema__)


#: A pod template in Python (a dict, passed on as written), checked and described as `PodTemplate`.
PodTemplateSpec = Annotated[dict[str, Any], _CheckedAs(PodTemplate)]
