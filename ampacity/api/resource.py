"""What the API server needs to know about a kind beyond its schema: names, scope, columns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ampacity.api.meta import API_VERSION, GROUP, VERSION, ApiModel, NameLimit, Status


def ready_column() -> dict[str, str]:
    return {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        "description": "Whether the object reached its desired state.",
    }


def reason_column() -> dict[str, Any]:
    return {
        "name": "Reason",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
        "description": "Why the object is or is not ready.",
        "priority": 1,
    }


def age_column() -> dict[str, str]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


@dataclass(frozen=True)
class Resource:
    """One custom resource kind: its models plus the CRD metadata around them."""

    kind: str
    plural: str
    scope: Literal["Namespaced", "Cluster"]
    spec: type[ApiModel]
    status: type[Status]
    description: str
    short_names: tuple[str, ...] = ()
    printer_columns: tuple[dict[str, Any], ...] = ()
    #: `scale` subresource paths, for kinds whose size standard tooling may read or set.
    scale: dict[str, str] | None = None
    categories: tuple[str, ...] = field(default=("ampacity",))
    #: Limits on the objects' names that the children named after them need.
    name_limit: NameLimit | None = None

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def group(self) -> str:
        return GROUP

    @property
    def version(self) -> str:
        return VERSION

    @property
    def api_version(self) -> str:
        return API_VERSION

    @property
    def namespaced(self) -> bool:
        return self.scope == "Namespaced"
