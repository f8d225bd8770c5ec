"""The generated CRDs on a real API server: installed, explained, and rejecting bad objects."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from ampacity.dev.cluster.kubectl import Kubectl
from tests.unit.test_api_constraints import BY_KIND, CASES, Case

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(kind: str) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load((EXAMPLES / f"{kind}.yaml").read_text())
    return manifest


def test_all_kinds_are_served(kubectl: Kubectl, crds: None) -> None:
    resources = kubectl("api-resources", "--api-group=ampacity.dev", "-o", "name").split()
    assert sorted(resources) == sorted(
        [
            "servingpools.ampacity.dev",
            "trainingjobs.ampacity.dev",
            "federatedrounds.ampacity.dev",
            "powerbudgets.ampacity.dev",
            "nodepowers.ampacity.dev",
        ]
    )


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("servingpool.spec.slo.ttft", "Time-to-first-token objective"),
        ("trainingjob.spec.checkpoint.retention.keepLast", "Keep the newest N complete checkpoints"),
        ("powerbudget.spec.thresholds.t2", "cap every GPU, lowest priority hardest"),
        ("federatedround.spec.aggregation.rule", "coordinate-wise"),
    ],
)
def test_kubectl_explain_shows_field_descriptions(
    kubectl: Kubectl, crds: None, field: str, expected: str
) -> None:
    assert expected in kubectl("explain", field)


def _mutate(manifest: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    result = copy.deepcopy(manifest)
    *parents, leaf = path.split(".")
    node = result
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return result


@pytest.mark.parametrize(
    ("kind", "path", "value", "message"),
    [
        ("servingpool", "spec.minGpus", 32, "minGpus must not exceed maxGpus"),
        ("servingpool", "spec.slo.ttft", "fast", "spec.slo.ttft"),
        ("servingpool", "spec.slo.tpot", "0ms", "spec.slo.tpot: Invalid value"),
        ("servingpool", "spec.slo.tpot", "0ms", "must be greater than zero"),
        ("servingpool", "spec.mode", "sideways", 'Unsupported value: "sideways"'),
        (
            "trainingjob",
            "spec.checkpoint.storage.persistentVolumeClaim",
            "ckpt",
            "needs exactly one of persistentVolumeClaim or uri",
        ),
        (
            "trainingjob",
            "spec.workers.minReplicas",
            9,
            "workers.minReplicas must not exceed workers.replicas",
        ),
        (
            "trainingjob",
            "spec.checkpoint.interval",
            {"policy": "fixed"},
            "every is required when policy is fixed",
        ),
        ("federatedround", "spec.minQuorum", 50, "minQuorum must not exceed cohortSize"),
        (
            "federatedround",
            "spec.localSteps",
            {"min": 10, "max": 2},
            "localSteps.min must not exceed localSteps.max",
        ),
        (
            "powerbudget",
            "spec.thresholds",
            {"t1": 0.97, "t2": 0.9},
            "thresholds.t1 must be below thresholds.t2",
        ),
        (
            "powerbudget",
            "spec.defaultPriorityClass",
            "gold",
            "defaultPriorityClass must name one of priorityClasses",
        ),
        ("powerbudget", "spec.limitWatts", -5, "spec.limitWatts"),
    ],
)
def test_api_server_rejects_invalid_objects_with_a_clear_message(
    kubectl: Kubectl, crds: None, kind: str, path: str, value: Any, message: str
) -> None:
    manifest = _mutate(example(kind), path, value)
    manifest["metadata"]["name"] = "invalid"
    result = kubectl.apply(manifest)
    assert result.returncode != 0, f"{kind} with {path}={value!r} was accepted"
    assert message in result.stderr
    assert kubectl.get(kind, "invalid", manifest["metadata"].get("namespace")) is None


def test_api_server_fills_defaults(kubectl: Kubectl, crds: None) -> None:
    manifest = example("powerbudget")
    manifest["metadata"]["name"] = "defaults"
    del manifest["spec"]["thresholds"]
    assert kubectl.apply(manifest).returncode == 0
    try:
        stored = kubectl.get("powerbudget", "defaults")
        assert stored is not None
        assert stored["spec"]["thresholds"] == {"t1": 0.85, "t2": 0.95}
        assert [c["name"] for c in stored["spec"]["priorityClasses"]] == ["batch", "interactive"]
    finally:
        kubectl("delete", "powerbudget", "defaults")


def _dry_run(kubectl: Kubectl, namespace: str, objects: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """Create the objects with a server-side dry run: what was accepted, and one error line each."""
    for obj in objects:
        if BY_KIND[obj["kind"].lower()].namespaced:
            obj["metadata"]["namespace"] = namespace
    result = kubectl.run(
        "create", "--dry-run=server", "-o", "name", "-f", "-", stdin=yaml.safe_dump_all(objects)
    )
    return result.stdout, [line for line in result.stderr.splitlines() if line.strip()]


def _named(case: Case, index: int, value: Any) -> dict[str, Any]:
    return case.manifest(value, f"walk-{index}")


def test_api_server_refuses_every_broken_constraint_with_its_message(
    kubectl: Kubectl, crds: None, namespace: str
) -> None:
    # One dry-run create for all cases; the error lines name the object they are about.
    objects = [_named(case, i, case.bad) for i, case in enumerate(CASES)]
    accepted, errors = _dry_run(kubectl, namespace, objects)
    for obj, case in zip(objects, CASES, strict=True):
        name = obj["metadata"]["name"]
        mine = [line for line in errors if f'"{name}"' in line]
        assert f"/{name}\n" not in accepted + "\n" and mine, f"{case.constraint}: {case.bad!r} was accepted"
        assert any(case.message in line for line in mine), f"{case.constraint}: {mine}"


def test_api_server_accepts_every_constraint_at_its_boundary(
    kubectl: Kubectl, crds: None, namespace: str
) -> None:
    objects = [_named(case, i, case.good) for i, case in enumerate(CASES)]
    accepted, errors = _dry_run(kubectl, namespace, objects)
    assert errors == []
    assert len(accepted.split()) == len(objects)


@pytest.mark.parametrize(
    ("kind", "name", "path", "value", "message"),
    [
        # The four reports that opened the issue, as a new user would meet them.
        ("servingpool", "p" * 64, None, None, "metadata.name must be at most 63 characters"),
        (
            "trainingjob",
            "notalist",
            "spec.template.spec.containers",
            "notalist",
            "spec.template.spec.containers",
        ),
        ("powerbudget", "stale", "spec.telemetryStaleness", "0s", "must be greater than zero"),
        (
            "federatedround",
            "http-model",
            "spec.model",
            "http://example.com/m.npz",
            "file:///state/<path>.npz",
        ),
    ],
)
def test_the_reported_bad_inputs_are_refused_on_apply(
    kubectl: Kubectl, crds: None, kind: str, name: str, path: str | None, value: Any, message: str
) -> None:
    manifest = example(kind) if path is None else _mutate(example(kind), path, value)
    manifest["metadata"]["name"] = name
    result = kubectl.apply(manifest)
    assert result.returncode != 0, f"{kind} {name} was accepted"
    assert message in result.stderr
