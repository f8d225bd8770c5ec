"""ServingPools of any model on any GPU reconcile to a plan or the fallback, on the local control
plane with kwok nodes that carry GPU Feature Discovery's real product labels; the operator
writes the plan `ampacity plan -f` previews, and the API server rejects contradicting
architectures."""

from __future__ import annotations

import copy
import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ampacity.data import data_dir, trace_path
from ampacity.dev.cluster.kubectl import Kubectl, condition
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.nodes import GpuNodeShape, gpu_node
from ampacity.dev.cluster.polling import wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
POOLS = sorted(EXAMPLES.glob("servingpool*.yaml"))


@pytest.fixture(scope="module")
def gfd_nodes(kubectl: Kubectl) -> list[str]:
    """One H200 and one A100 server beside the session's H100 nodes."""
    names = []
    for index, gpu_type in enumerate(("h200", "a100")):
        node = gpu_node(f"planner-{gpu_type}-0", 40 + index, GpuNodeShape(gpu_type=gpu_type))
        kubectl.run("create", "-f", "-", stdin=json.dumps(node))
        names.append(node["metadata"]["name"])
    labels = {n: kubectl.get("node", n)["metadata"]["labels"]["nvidia.com/gpu.product"] for n in names}
    assert labels == {"planner-h200-0": "NVIDIA-H200", "planner-a100-0": "NVIDIA-A100-SXM4-80GB"}
    return names


def _pool(path: Path, namespace: str) -> dict[str, Any]:
    pool: dict[str, Any] = yaml.safe_load(path.read_text())
    pool["metadata"]["namespace"] = namespace
    return pool


def _planned(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        obj = kubectl.get("servingpool", name, namespace)
        planned = condition(obj, "Planned")
        if obj and planned and planned["observedGeneration"] == obj["metadata"]["generation"]:
            return obj
        return None

    return wait_for(done, timeout=120, what=f"ServingPool {name} planned")


def _preview(manifest: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / f"{manifest['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    out = subprocess.run(
        [sys.executable, "-m", "ampacity.cli", "plan", "-f", str(path), "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize("path", POOLS, ids=lambda p: p.name)
def test_every_example_reconciles_to_the_plan_the_preview_shows(
    kubectl: Kubectl,
    operator: LocalOperator,
    namespace: str,
    gfd_nodes: list[str],
    path: Path,
    tmp_path: Path,
) -> None:
    pool = _pool(path, namespace)
    assert kubectl.apply(pool).returncode == 0
    obj = _planned(kubectl, namespace, pool["metadata"]["name"])
    planned = condition(obj, "Planned")
    source = condition(obj, "LatencyModel")
    assert planned is not None and planned["status"] == "True", planned
    assert source is not None and source["reason"] in ("Calibrated", "Extrapolated"), source
    shown = _preview(pool, tmp_path)
    assert obj["status"]["plan"] == shown["status"]["plan"]
    if pool["spec"]["gpuType"] == "NVIDIA-H200":
        assert "extrapolated from h100" in obj["status"]["plan"]["latencyModel"]


def test_an_unknown_model_runs_on_the_fallback_with_a_clear_condition(
    kubectl: Kubectl, operator: LocalOperator, namespace: str
) -> None:
    pool = _pool(EXAMPLES / "servingpool-llama31-8b.yaml", namespace)
    pool["metadata"]["name"] = "no-architecture"
    del pool["spec"]["model"]["architecture"]
    pool["spec"]["gpuType"] = "NVIDIA-H100-80GB-HBM3"
    assert kubectl.apply(pool).returncode == 0
    obj = _planned(kubectl, namespace, "no-architecture")
    planned = condition(obj, "Planned")
    assert planned is not None and planned["status"] == "False" and planned["reason"] == "NoLatencyModel"
    assert "spec.model.architecture" in planned["message"]
    plan = obj["status"]["plan"]
    assert plan["mode"] == "colocated" and plan["prefillTensorParallel"] == 1
    engine = wait_for(
        lambda: kubectl.get("deployment", "no-architecture-engine", namespace),
        what="fallback engine Deployment",
    )
    assert engine["spec"]["replicas"] == plan["prefillReplicas"]


def test_a_missing_latency_profile_names_the_configmap(
    kubectl: Kubectl, operator: LocalOperator, namespace: str
) -> None:
    pool = _pool(EXAMPLES / "servingpool.yaml", namespace)
    pool["metadata"]["name"] = "profiled"
    pool["spec"]["latencyProfile"] = {"configMap": "llama-h100-latencies"}
    assert kubectl.apply(pool).returncode == 0
    obj = _planned(kubectl, namespace, "profiled")
    planned = condition(obj, "Planned")
    assert planned is not None and planned["reason"] == "LatencyProfileInvalid"
    assert "'llama-h100-latencies'" in planned["message"]
    if not data_dir().exists():
        return
    # Once the ConfigMap exists the pool is planned on the latencies fitted to it.
    with trace_path("splitwise", "perf_model.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if (r["model"], r["hardware"]) == ("llama2-70b", "h100-80gb")]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "llama-h100-latencies", "namespace": namespace},
        "data": {"perf_model.csv": text.getvalue()},
    }
    assert kubectl.apply(config_map).returncode == 0

    def fitted() -> dict[str, Any] | None:
        source = condition(kubectl.get("servingpool", "profiled", namespace), "LatencyModel")
        return source if source and source["reason"] == "Fitted" else None

    source = wait_for(fitted, timeout=120, what="plan fitted to the profile")
    assert "held-out median error" in source["message"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_key_value_heads": 5}, "num_key_value_heads must divide num_attention_heads"),
        ({"num_attention_heads": 30}, "num_attention_heads must divide hidden_size"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok must not exceed the number of experts"),
    ],
)
def test_the_api_server_rejects_contradicting_architectures(
    kubectl: Kubectl, crds: None, namespace: str, change: dict[str, int], message: str
) -> None:
    pool = _pool(EXAMPLES / "servingpool-mixtral.yaml", namespace)
    bad = copy.deepcopy(pool)
    bad["spec"]["model"]["architecture"] |= change
    result = kubectl.apply(bad)
    assert result.returncode != 0
    assert message in result.stderr
