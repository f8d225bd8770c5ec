"""TrainingJob controller helpers without a cluster: admission, accounting, worker pods."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import pytest

from ampacity.api import TRAINING_JOB
from ampacity.api.trainingjob import CheckpointCost, CheckpointRecord, TrainingJobSpec, TrainingJobStatus
from controllers import tokens
from controllers.reconciler import Context
from controllers.trainingjob import reports
from controllers.trainingjob.admission import GangAdmission, Reservation
from controllers.trainingjob.controller import (
    broken_workers,
    close_exposure,
    interval_stale,
    issue_token,
    node_ready,
    resume_step,
    spec_revision,
    token_secret,
    unbound_too_long,
    work_lost,
    worker_pod,
)
from controllers.trainingjob.history import ClusterFailureHistory
from tests.fakes import FakeKube

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def spec(**workers: Any) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate(
        {
            "workers": {"replicas": 4, "gpusPerWorker": 2, **workers},
            "template": {"spec": {"containers": [{"name": "t", "image": "i"}]}},
            "checkpoint": {"storage": {"uri": "s3://b/p"}, "retention": {"keepLast": 2, "keepEvery": 100}},
            "failurePolicy": {"backoff": "5s"},
        }
    )


def context(job_spec: TrainingJobSpec, status: TrainingJobStatus | None = None) -> Context:
    body = kopf.Body({"metadata": {"name": "llm", "namespace": "ns", "uid": "u-1", "generation": 1}})
    return Context(TRAINING_JOB, body, job_spec, status or TrainingJobStatus(), kube=FakeKube(), logger=None)


def node(name: str, gpus: int, **spec_: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"pool": "a"}},
        "spec": spec_,
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}},
    }


def pod(node_name: str | None, gpus: int, phase: str = "Running") -> dict[str, Any]:
    return {
        "spec": {
            "nodeName": node_name,
            "containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}, {"resources": {}}],
        },
        "status": {"phase": phase},
    }


def test_work_lost_counts_steps_since_the_checkpoint_and_the_backoff_on_every_gpu() -> None:
    status = TrainingJobStatus(
        replicas=4,
        current_step=150,
        step_seconds=2.0,
        latest_checkpoint=CheckpointRecord(step=100, time=NOW),
    )
    assert resume_step(spec(), status) == 100
    assert work_lost(spec(), status) == pytest.approx((50 * 2.0 + 5.0) * 8)
    # Nothing reported: only the backoff; no GPUs: nothing.
    assert work_lost(spec(), TrainingJobStatus(replicas=4)) == pytest.approx(5.0 * 8)
    assert work_lost(spec(gpusPerWorker=0), status) == 0.0


def test_exposure_folds_the_stopped_gang_in() -> None:
    status = TrainingJobStatus(nodes=2, exposure_node_hours=1.0, gang_start_time=NOW - timedelta(hours=3))
    close_exposure(status, NOW)
    assert status.exposure_node_hours == pytest.approx(7.0)
    assert status.gang_start_time is None


def test_interval_is_redecided_when_the_policy_changes() -> None:
    auto = spec()
    fixed = TrainingJobSpec.model_validate(
        auto.model_dump(by_alias=True)
        | {"checkpoint": {"storage": {"uri": "s3://b"}, "interval": {"policy": "fixed", "every": "30m"}}}
    )
    assert interval_stale(auto, TrainingJobStatus())
    decided = TrainingJobStatus(
        checkpoint_interval=1800.0, checkpoint_interval_reason="fixed: 30 min as declared"
    )
    assert not interval_stale(fixed, decided)
    assert interval_stale(auto, decided)
    assert interval_stale(fixed, decided.model_copy(update={"checkpoint_interval": 60.0}))
    measured = TrainingJobStatus(checkpoint_interval=900.0, checkpoint_interval_reason="auto: 15 min, ...")
    assert not interval_stale(auto, measured)
    assert interval_stale(fixed, measured)


def test_worker_env_carries_gang_report_and_retention_settings() -> None:
    status = TrainingJobStatus(
        latest_checkpoint=CheckpointRecord(step=70, time=NOW), checkpoint_interval=900.0
    )
    ctx = context(spec(), status)
    manifest = worker_pod(ctx, ctx.spec, 1, 4, gang=3)
    container = manifest["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["AMPACITY_ATTEMPT"] == "3"
    assert env["AMPACITY_RESUME_STEP"] == "70"
    assert env["AMPACITY_REPORT_URL"].endswith("/v1/namespaces/ns/trainingjobs/llm/reports")
    assert env["AMPACITY_REPORT_TOKEN_FILE"] == "/var/run/ampacity/report/token"
    assert (env["AMPACITY_RETENTION_KEEP_LAST"], env["AMPACITY_RETENTION_KEEP_EVERY"]) == ("2", "100")
    assert env["AMPACITY_CHECKPOINT_INTERVAL_SECONDS"] == "900"
    # torchrun's PET_* variables (as Kubeflow Trainer sets them) and init_process_group's.
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_NODE_RANK"]) == ("4", "2", "1")
    assert env["PET_MASTER_ADDR"] == env["MASTER_ADDR"] == "llm-worker-0.llm"
    assert env["PET_MASTER_PORT"] == env["MASTER_PORT"] == "29500"
    assert (env["WORLD_SIZE"], env["RANK"]) == ("4", "1")
    assert {"name": "rendezvous", "containerPort": 29500} in container["ports"]
    assert env["AMPACITY_CHECKPOINT_URI"] == "s3://b/p"
    assert "AMPACITY_CHECKPOINT_ENDPOINT" not in env
    assert "envFrom" not in container


def test_object_storage_endpoint_and_credentials_reach_every_container() -> None:
    job = spec()
    job.checkpoint.storage.endpoint = "http://minio.storage:9000"
    job.checkpoint.storage.credentials_secret = "ckpt-s3"
    job.template["spec"]["containers"].append({"name": "sidecar", "image": "s"})
    manifest = worker_pod(context(job), job, 0, 4, gang=0)
    for container in manifest["spec"]["containers"]:
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["AMPACITY_CHECKPOINT_ENDPOINT"] == "http://minio.storage:9000"
        assert container["envFrom"] == [{"secretRef": {"name": "ckpt-s3"}}]
    assert spec_revision(job) != spec_revision(spec())
    assert manifest["metadata"]["labels"]["ampacity.dev/world-size"] == "4"
    assert manifest["spec"]["volumes"] == [
        {"name": "ampacity-report-token", "secret": {"secretName": "llm-report-token", "defaultMode": 0o400}}
    ]
    assert container["volumeMounts"][0]["mountPath"] == "/var/run/ampacity/report"


def test_a_gs_credentials_secret_is_mounted_as_the_key_file_googles_clients_read() -> None:
    job = spec()
    job.checkpoint.storage.uri = "gs://bucket/llm"
    job.checkpoint.storage.credentials_secret = "ckpt-gcs"
    manifest = worker_pod(context(job), job, 0, 4, gang=0)
    assert {
        "name": "checkpoint-credentials",
        "secret": {
            "secretName": "ckpt-gcs",
            "items": [{"key": "key.json", "path": "key.json"}],
            "defaultMode": 0o400,
        },
    } in manifest["spec"]["volumes"]
    for container in manifest["spec"]["containers"]:
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["GOOGLE_APPLICATION_CREDENTIALS"] == "/var/run/ampacity/gcs/key.json"
        assert {
            "name": "checkpoint-credentials",
            "mountPath": "/var/run/ampacity/gcs",
            "readOnly": True,
        } in container["volumeMounts"]
        # Not also as environment variables: the key file's JSON is not one.
        assert "envFrom" not in container


def test_token_secret_is_per_job_unguessable_and_owned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Derived from the operator key and the job's uid: stable for the job (a restarted operator
    derives it again), different for every other job and under every other key."""
    monkeypatch.setenv(tokens.KEY_ENV, "operator-key")
    ctx = context(spec())
    token = reports.report_token("u-1")
    a, b = token_secret(ctx, token), token_secret(ctx, reports.report_token("u-1"))
    assert a["data"]["token"] == b["data"]["token"]
    assert reports.report_token("u-2") != token
    monkeypatch.setenv(tokens.KEY_ENV, "another-key")
    assert reports.report_token("u-1") != token
    assert len(base64.urlsafe_b64decode(token + "=")) == 32  # 256 bits
    assert a["metadata"]["name"] == "llm-report-token"
    assert a["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert a["metadata"]["labels"]["ampacity.dev/trainingjob"] == "llm"


def test_a_failed_worker_or_a_lost_node_breaks_the_gang() -> None:
    def worker(name: str, node_name: str | None, phase: str = "Running", **meta: Any) -> dict[str, Any]:
        return {
            "metadata": {"name": name, **meta},
            "spec": {"nodeName": node_name},
            "status": {"phase": phase},
        }

    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    silent = {"status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}
    assert node_ready(ready) and node_ready({}) and not node_ready(silent)
    nodes = {"a": ready, "b": silent, "c": None}
    pods = [
        worker("w-0", "a"),
        worker("w-1", "b"),
        worker("w-2", "c"),
        worker("w-3", "a", "Failed"),
        worker("w-4", None),
        worker("w-5", "b", deletionTimestamp="2026-01-01T00:00:00Z"),
    ]
    assert broken_workers(pods, nodes) == [
        "node b of worker w-1 is not ready",
        "node c of worker w-2 is gone",
        "worker w-3 failed",
    ]
    assert broken_workers(pods[:1] + pods[4:], nodes) == []


def test_revision_moves_with_what_a_running_worker_cannot_change() -> None:
    base = spec()
    assert spec_revision(base) == spec_revision(spec())
    assert spec_revision(spec(replicas=2, minReplicas=1)) == spec_revision(base)  # a resize, not an update
    assert spec_revision(spec(gpusPerWorker=4)) != spec_revision(base)
    edited = base.model_copy(update={"template": {"spec": {"containers": [{"name": "t", "image": "j"}]}}})
    assert spec_revision(edited) != spec_revision(base)
    ctx = context(base)
    assert worker_pod(ctx, base, 0, 4, gang=0)["metadata"]["labels"][
        "ampacity.dev/revision"
    ] == spec_revision(base)


async def test_a_lost_token_secret_is_replaced_never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tokens.KEY_ENV, "operator-key")
    kube = FakeKube()
    old = base64.b64encode(b"old").decode()
    kube.add(
        {
            "kind": "Secret",
            "metadata": {"name": "llm-report-token", "namespace": "ns"},
            "data": {"token": old},
        }
    )
    ctx = context(spec())
    ctx.kube = kube
    digest = await issue_token(ctx)
    assert [m for m, kind in kube.calls if kind == "Secret"] == ["create", "delete", "create"]
    written = kube.stored("Secret", "ns", "llm-report-token")
    assert written is not None
    token = base64.b64decode(written["data"]["token"]).decode()
    assert digest == reports.token_hash(token) != reports.token_hash("old")
    # Once the status holds the hash, a pass writes nothing.
    ctx.status.report_token_hash = digest
    assert await issue_token(ctx) == digest
    assert len([1 for _, kind in kube.calls if kind == "Secret"]) == 3


def test_a_worker_is_pinned_to_its_reserved_node_within_the_users_affinity() -> None:
    job = spec()
    job.template["spec"]["affinity"] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]},
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h200"]}]},
                ]
            }
        }
    }
    manifest = worker_pod(context(job), job, 2, 4, gang=0, node="gpu-7")
    terms = manifest["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    pin = {"key": "metadata.name", "operator": "In", "values": ["gpu-7"]}
    assert [t["matchFields"] for t in terms] == [[pin], [pin]]  # ANDed into each ORed term
    assert terms[0]["matchExpressions"][0]["values"] == ["h100"]
    assert "affinity" not in job.template["spec"]["affinity"]  # the spec itself is left alone
    plain = worker_pod(context(spec()), spec(), 0, 4, gang=0, node="gpu-1")
    assert plain["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == {
        "nodeSelectorTerms": [{"matchFields": [pin | {"values": ["gpu-1"]}]}]
    }


def test_reservations_hold_until_the_pods_are_bound_and_unbound_workers_time_out() -> None:
    admission = GangAdmission()
    admission.reservations["ns/a"] = Reservation({"a-worker-0": ("n1", 8), "a-worker-1": ("n2", 8)})
    admission.reservations["ns/b"] = Reservation({"b-worker-0": ("n1", 0), "b-worker-1": ("", 0)})
    assert admission.reserved([]) == {"n1": 8, "n2": 8}
    bound = [{"metadata": {"namespace": "ns", "name": "a-worker-0"}, "spec": {"nodeName": "n1"}}]
    assert admission.reserved(bound) == {"n2": 8}
    both = [*bound, {"metadata": {"namespace": "ns", "name": "a-worker-1"}, "spec": {"nodeName": "n2"}}]
    assert admission.reserved(both) == {} and "ns/a" not in admission.reservations
    admission.forget("ns/b")
    assert not admission.reservations

    def worker(name: str, age: float, node: str | None = None) -> dict[str, Any]:
        created = (NOW - timedelta(seconds=age)).isoformat().replace("+00:00", "Z")
        return {"metadata": {"name": name, "creationTimestamp": created}, "spec": {"nodeName": node}}

    pods = [worker("w-0", 500, "n1"), worker("w-1", 500), worker("w-2", 10)]
    assert unbound_too_long(pods, NOW) == ["w-1"]


def test_the_other_jobs_failures_move_this_jobs_interval() -> None:
    history = ClusterFailureHistory()
    assert history.record("ns/a", 0, 100.0) == (0, 0.0)
    history.record("ns/b", 6, 3000.0)
    assert history.record("ns/a", 1, 120.0) == (6, 3000.0)  # never its own: that is the job's evidence
    assert history.record("ns/c", 0, 0.0) == (7, 3120.0)
    job = spec()
    measured = CheckpointCost(step=10, stall_seconds=1.0, persist_seconds=30.0)
    quiet = TrainingJobStatus(nodes=64, checkpoint_cost=measured)
    flaky = quiet.model_copy(update={"cluster_failures": 40, "cluster_exposure_node_hours": 2000.0})
    calm = quiet.model_copy(update={"cluster_failures": 0, "cluster_exposure_node_hours": 2e6})
    interval = {
        name: reports.decide_interval(job, status, NOW).interval_seconds
        for name, status in (("quiet", quiet), ("flaky", flaky), ("calm", calm))
    }
    assert interval["flaky"] < interval["quiet"] < interval["calm"]
    assert "40 failures in 2000 node-h on this cluster" in reports.decide_interval(job, flaky, NOW).reason
