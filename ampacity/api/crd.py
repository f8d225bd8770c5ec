"""Generate CustomResourceDefinitions from the pydantic models.

Pydantic emits JSON Schema 2020-12; the API server wants a *structural*
OpenAPI v3 schema: no `$ref`, no `anyOf` with null, a `type` on every node,
boolean `exclusiveMinimum`. This module rewrites one into the other and adds
the CRD metadata from `Resource`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema, to_jsonable_python

from ampacity.api.meta import ApiModel
from ampacity.api.resource import Resource

Schema = dict[str, Any]

# Keys pydantic emits that carry no meaning for the API server.
_DROPPED_KEYS = {"title", "$defs"}


class _WithFactoryDefaults(GenerateJsonSchema):
    """Also emit defaults made by `default_factory`, so the API server fills them in.

    Without them a CEL rule over a defaulted list (or `kubectl get -o yaml`)
    would see the field missing where the operator sees the default.
    """

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().default_schema(schema)
        json_schema = self.generate_inner(schema["schema"])
        json_schema["default"] = to_jsonable_python(factory(), by_alias=True, exclude_none=True)  # type: ignore[call-arg]
        return json_schema


def _inline_refs(node: Any, defs: dict[str, Schema]) -> Any:
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        # Field-level keywords (description, default) win over the referenced model's.
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _inline_refs(merged, defs)
    return {key: _inline_refs(value, defs) for key, value in node.items()}


def _structural(node: Schema) -> Schema:
    """Rewrite one inlined JSON-schema node (and its children) into structural OpenAPI v3."""
    node = {k: v for k, v in node.items() if k not in _DROPPED_KEYS}
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        # Optional[X] becomes X: the field is optional because it is not required,
        # and the operator omits unset fields rather than writing null.
        non_null = [branch for branch in any_of if branch.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"only Optional[X] unions can become a structural schema, got {any_of}")
        node = {k: v for k, v in {**non_null[0], **node}.items() if k not in _DROPPED_KEYS}
        if node.get("default", "absent") is None:
            del node["default"]
    if isinstance(node.get("exclusiveMinimum"), int | float) and not isinstance(
        node["exclusiveMinimum"], bool
    ):
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if isinstance(node.get("exclusiveMaximum"), int | float) and not isinstance(
        node["exclusiveMaximum"], bool
    ):
        bound = node.pop("exclusiveMaximum")
        if float(bound).is_integer():
            node["maximum"], node["exclusiveMaximum"] = bound, True
        else:
            # The API server compares a whole-number value with a fractional exclusive maximum
            # as integers (0 < int(0.5) fails: "should be less than 0"), so CEL checks it instead.
            node["maximum"] = bound
            rules = node.setdefault("x-kubernetes-validations", [])
            rules.append({"rule": f"self < {bound!r}", "message": f"must be less than {bound:g}"})
    if node.get("additionalProperties") is True:
        del node["additionalProperties"]
        node["x-kubernetes-preserve-unknown-fields"] = True
    if "properties" in node:
        node["properties"] = {name: _structural(prop) for name, prop in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _structural(node["additionalProperties"])
    if "items" in node:
        node["items"] = _structural(node["items"])
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "type" not in node and not (
        node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
    ):
        raise ValueError(f"schema node has no type, so it is not structural: {node}")
    return node


def openapi_schema(model: type[ApiModel]) -> Schema:
    """The structural OpenAPI v3 schema of a model, with camelCase field names."""
    raw = model.model_json_schema(by_alias=True, mode="serialization", schema_generator=_WithFactoryDefaults)
    return _structural(_inline_refs(raw, raw.get("$defs", {})))


def custom_resource_definition(resource: Resource) -> Schema:
    """The CustomResourceDefinition for one kind."""
    spec_schema = openapi_schema(resource.spec)
    status_schema = openapi_schema(resource.status)
    subresources: Schema = {"status": {}}
    # Rules on the whole object: only here may CEL read metadata.name.
    root_rules: Schema = (
        {"x-kubernetes-validations": [rule.schema() for rule in resource.name_limit.validations()]}
        if resource.name_limit
        else {}
    )
    if resource.scale:
        subresources["scale"] = dict(resource.scale)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": resource.crd_name,
            "labels": {"app.kubernetes.io/name": "ampacity", "app.kubernetes.io/part-of": "ampacity"},
        },
        "spec": {
            "group": resource.group,
            "scope": resource.scope,
            "names": {
                "kind": resource.kind,
                "listKind": f"{resource.kind}List",
                "plural": resource.plural,
                "singular": resource.singular,
                "shortNames": list(resource.short_names),
                "categories": list(resource.categories),
            },
            "versions": [
                {
                    "name": resource.version,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "additionalPrinterColumns": [dict(c) for c in resource.printer_columns],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": resource.description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {
                                    "type": "string",
                                    "description": "APIVersion of the object: ampacity.dev/v1alpha1.",
                                },
                                "kind": {
                                    "type": "string",
                                    "description": f"Kind of the object: {resource.kind}.",
                                },
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                            **root_rules,
                        }
                    },
                }
            ],
        },
    }


def render(resource: Resource) -> str:
    """The CRD as the YAML checked in under crds/."""
    header = "# Generated by `ampacity crds generate` from ampacity/api; do not edit by hand.\n"
    return header + yaml.safe_dump(custom_resource_definition(resource), sort_keys=False, width=100)


def crd_filename(resource: Resource) -> str:
    return f"{resource.group}_{resource.plural}.yaml"


def write_all(resources: tuple[Resource, ...], out_dir: Path) -> list[Path]:
    """Write one YAML file per kind; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for resource in resources:
        path = out_dir / crd_filename(resource)
        path.write_text(render(resource))
        paths.append(path)
    return paths


def stale_files(resources: tuple[Resource, ...], out_dir: Path) -> list[Path]:
    """The checked-in CRD files that differ from what the models generate now."""
    return [
        out_dir / crd_filename(r)
        for r in resources
        if not (out_dir / crd_filename(r)).exists() or (out_dir / crd_filename(r)).read_text() != render(r)
    ]
