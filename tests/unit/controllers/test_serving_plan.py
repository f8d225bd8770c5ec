"""Sizing a ServingPool from its spec with the goodput planner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ampacity.api.servingpool import ServingPoolSpec
from ampacity.serving.lengths import SOURCES, load_profile, profile_from_trace
from controllers.servingpool.controller import warm_node_preferences
from controllers.servingpool.plan import PlanningError, plan_pool

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "servingpool.yaml"


def spec(**changes: Any) -> ServingPoolSpec:
    raw = yaml.safe_load(EXAMPLE.read_text())["spec"]
    for path, value in changes.items():
        node = raw
        *parents, leaf = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return ServingPoolSpec.model_validate(raw)


def test_mode_is_honoured_and_auto_takes_the_higher_goodput_per_gpu() -> None:
    colocated = plan_pool(spec(mode="colocated")).plan
    disaggregated = plan_pool(spec(mode="disaggregated")).plan
    auto = plan_pool(spec(mode="auto")).plan
    assert colocated.mode == "colocated" and colocated.decode_replicas == 0
    assert disaggregated.mode == "disaggregated" and disaggregated.decode_replicas >= 1
    best = max((colocated, disaggregated), key=lambda p: p.predicted_goodput)
    assert auto.mode == best.mode


def test_peak_rate_adds_instances_until_max_gpus_caps_them() -> None:
    small = plan_pool(spec(workload__peakRate=2.0, minGpus=0)).plan
    large = plan_pool(spec(workload__peakRate=40.0, minGpus=0, maxGpus=64)).plan
    assert large.gpus > small.gpus
    assert large.capacity >= 40.0
    capped = plan_pool(spec(workload__peakRate=40.0, minGpus=0, maxGpus=16))
    assert capped.plan.gpus <= 16
    assert "maxGpus 16" in capped.limited_by


def test_min_gpus_is_respected() -> None:
    assert plan_pool(spec(minGpus=16, maxGpus=32)).plan.gpus >= 16


def test_unplannable_specs_say_why() -> None:
    # An unknown model runs on the fallback plan (tests/unit/serving/test_pool_plan.py).
    assert plan_pool(spec(model__name="gpt-9")).reason == "NoLatencyModel"
    with pytest.raises(PlanningError, match="maxGpus is 1"):
        plan_pool(spec(minGpus=0, maxGpus=1))


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_shipped_length_profiles_match_the_traces(name: str) -> None:
    assert load_profile(name) == profile_from_trace(name), "run `python -m ampacity.serving.lengths`"


def _node(name: str, labels: dict[str, str]) -> dict[str, Any]:
    base = {"ampacity.dev/gpu-type": "h100", "kubernetes.io/hostname": name}
    return {
        "metadata": {"name": name, "labels": base | labels},
        "status": {"allocatable": {"nvidia.com/gpu": "8"}},
    }


def test_engines_prefer_nodes_that_cache_the_weights() -> None:
    cold = [_node(f"cold-{i}", {}) for i in range(3)]
    assert warm_node_preferences(cold, spec(), tp=2) == [], "nothing cached: no preference"
    nodes = [
        *cold,
        _node("warm-host", {"models.ampacity.dev/llama2-70b": "host"}),
        _node("warm-ssd", {"models.ampacity.dev/llama2-70b": "ssd"}),
        _node("a100", {"ampacity.dev/gpu-type": "a100", "models.ampacity.dev/llama2-70b": "gpu"}),
    ]
    terms = warm_node_preferences(nodes, spec(), tp=2)
    order = [t["preference"]["matchExpressions"][0]["values"][0] for t in terms]
    weights = [t["weight"] for t in terms]
    assert order[:2] == ["warm-host", "warm-ssd"] and "a100" not in order
    assert weights[0] == 100 and weights == sorted(weights, reverse=True) and weights[-1] < weights[1]


def test_gpu_type_selects_nodes_by_either_name() -> None:
    from controllers.servingpool.controller import _affinity

    for gpu_type in ("h200", "NVIDIA-H200"):
        terms = _affinity(gpu_type, [])["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        values = {
            t["matchExpressions"][0]["key"]: t["matchExpressions"][0]["values"]
            for t in terms["nodeSelectorTerms"]
        }
        assert "h200" in values["ampacity.dev/gpu-type"]
        assert "NVIDIA-H200" in values["nvidia.com/gpu.product"]
    # A GPU outside the catalogue is matched as written.
    terms = _affinity("acme-x1", [])["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert all(t["matchExpressions"][0]["values"] == ["acme-x1"] for t in terms["nodeSelectorTerms"])
