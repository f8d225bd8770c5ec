"""The API models and the CRDs generated from them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from ampacity.api import FEDERATED_ROUND, POWER_BUDGET, RESOURCES, SERVING_POOL, TRAINING_JOB
from ampacity.api.cli import CRD_DIRS
from ampacity.api.crd import custom_resource_definition, stale_files
from ampacity.api.meta import Status, format_duration, parse_duration
from ampacity.api.servingpool import ServingPoolSpec
from ampacity.api.trainingjob import TrainingJobSpec

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_crds_match_the_models() -> None:
    for folder in CRD_DIRS:
        assert stale_files(RESOURCES, REPO / folder) == [], "run `ampacity crds generate`"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    nodes = [(path, node)]
    for name, child in node.get("properties", {}).items():
        nodes += _walk(child, f"{path}.{name}")
    if "items" in node:
        nodes += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        nodes += _walk(node["additionalProperties"], f"{path}{{}}")
    return nodes


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.kind)
def test_schemas_are_structural_and_documented(resource: Any) -> None:
    schema = custom_resource_definition(resource)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
        assert (
            "type" in node
            or node.get("x-kubernetes-preserve-unknown-fields")
            or node.get("x-kubernetes-int-or-string")
        ), f"{path} has no type"
        if path.startswith((".spec", ".status")):
            assert node.get("description") or path.endswith("[]") or path.endswith("{}"), (
                f"{path} undocumented"
            )


# The kinds users write; NodePower objects are the operator's and its agents'.
USER_KINDS = (SERVING_POOL, TRAINING_JOB, FEDERATED_ROUND, POWER_BUDGET)


@pytest.mark.parametrize("resource", USER_KINDS, ids=lambda r: r.kind)
def test_examples_parse_with_the_models(resource: Any) -> None:
    manifest = yaml.safe_load((REPO / "examples" / f"{resource.singular}.yaml").read_text())
    assert manifest["kind"] == resource.kind
    resource.spec.model_validate(manifest["spec"])


def test_durations_round_trip() -> None:
    assert parse_duration("100ms") == pytest.approx(0.1)
    assert parse_duration("1h30m") == 5400
    assert parse_duration("1.5s") == 1.5
    assert format_duration(0.1) == "100ms"
    assert format_duration(5400) == "1h30m"
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("fast")


def test_spec_models_speak_camel_case_and_seconds() -> None:
    spec = ServingPoolSpec.model_validate(
        {
            "model": {"name": "llama2-70b", "uri": "hf://meta-llama/Llama-2-70b-hf"},
            "engine": {"image": "vllm"},
            "gpuType": "h100",
            "slo": {"ttft": "1s", "tpot": "100ms"},
            "maxGpus": 8,
        }
    )
    assert spec.slo.tpot == pytest.approx(0.1)
    assert spec.to_api()["slo"] == {"ttft": "1s", "tpot": "100ms", "attainment": 0.9}
    with pytest.raises(ValidationError):
        TrainingJobSpec.model_validate(
            {"workers": {"replicas": 0}, "template": {}, "checkpoint": {"storage": {}}}
        )


def test_condition_transition_time_moves_only_on_status_change() -> None:
    status = Status()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    status.set_condition("Ready", "False", "Starting", "0/2", generation=1, now=t0)
    status.set_condition("Ready", "False", "Starting", "1/2", generation=1, now=t0 + timedelta(seconds=5))
    ready = status.condition("Ready")
    assert ready is not None and ready.last_transition_time == t0 and ready.message == "1/2"
    status.set_condition("Ready", "True", "Ready", "2/2", generation=2, now=t0 + timedelta(seconds=9))
    ready = status.condition("Ready")
    assert ready is not None and ready.last_transition_time == t0 + timedelta(seconds=9)
    assert ready.observed_generation == 2 and len(status.conditions) == 1
