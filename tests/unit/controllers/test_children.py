"""The objects reconcilers build, checked without a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from ampacity.api import POWER_BUDGET, TRAINING_JOB, Resource
from ampacity.api.powerbudget import NodeSelector
from ampacity.api.trainingjob import CheckpointRecord
from controllers.powerbudget.controller import label_selector
from controllers.reconciler import Context, _reconcile_once
from controllers.trainingjob.controller import worker_pod
from tests.fakes import FakeKube

REPO = Path(__file__).resolve().parents[3]


def context(resource: Resource, spec: dict[str, Any] | None = None) -> Context:
    manifest = yaml.safe_load((REPO / "examples" / f"{resource.singular}.yaml").read_text())
    manifest["metadata"] |= {"uid": "0000-1111", "generation": 3}
    if spec is not None:
        manifest["spec"] = spec
    body = kopf.Body(manifest)
    return Context(
        resource,
        body,
        resource.spec.model_validate(manifest["spec"]),
        resource.status(),
        kube=FakeKube(),
        logger=None,
    )


def test_workers_get_rank_world_size_and_rendezvous() -> None:
    ctx = context(TRAINING_JOB)
    ctx.status.latest_checkpoint = CheckpointRecord(step=1200, time="2026-01-01T00:00:00Z")
    pods = [worker_pod(ctx, ctx.spec, rank, 4, gang=2) for rank in range(4)]
    envs = [{e["name"]: e["value"] for e in p["spec"]["containers"][0]["env"]} for p in pods]
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert {e["MASTER_ADDR"] for e in envs} == {"gpt-pretrain-worker-0.gpt-pretrain"}
    assert {e["AMPACITY_RESUME_STEP"] for e in envs} == {"1200"}
    assert all(p["metadata"]["labels"]["ampacity.dev/gang"] == "2" for p in pods)
    assert pods[0]["metadata"]["ownerReferences"][0] == {
        "apiVersion": "ampacity.dev/v1alpha1",
        "kind": "TrainingJob",
        "name": "gpt-pretrain",
        "uid": "0000-1111",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert pods[0]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert pods[0]["spec"]["restartPolicy"] == "Never"


def test_label_selector_renders_every_operator() -> None:
    selector = NodeSelector.model_validate(
        {
            "matchLabels": {"ampacity.dev/row": "a"},
            "matchExpressions": [
                {"key": "rack", "operator": "In", "values": ["r1", "r2"]},
                {"key": "zone", "operator": "NotIn", "values": ["z9"]},
                {"key": "gpu", "operator": "Exists"},
                {"key": "drain", "operator": "DoesNotExist"},
            ],
        }
    )
    assert label_selector(selector) == "ampacity.dev/row=a,rack in (r1,r2),zone notin (z9),gpu,!drain"


async def test_invalid_spec_sets_a_condition_instead_of_raising() -> None:
    body = kopf.Body(
        {
            "apiVersion": "ampacity.dev/v1alpha1",
            "kind": "PowerBudget",
            "metadata": {"name": "broken", "generation": 7},
            "spec": {"limitWatts": "lots"},
        }
    )

    async def never(_: Context) -> None:
        pytest.fail("reconcile ran on an invalid spec")

    ctx = await _reconcile_once(POWER_BUDGET, never, body, kube=FakeKube(), logger=None)
    ready = ctx.status.condition("Ready")
    assert ready.status == "False" and ready.reason == "InvalidSpec"
    assert "spec.limitWatts" in ready.message and "spec.nodeSelector" in ready.message
    assert ready.observed_generation == 7
