"""The TrainingJob reconciler end to end against the fake API server: children, conditions, the
status patch skipped when nothing changed, report fields left to the report endpoint, failures in words."""

from __future__ import annotations

import copy
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from ampacity.api import TRAINING_JOB
from ampacity.kube import ApiUnavailable
from controllers import tokens
from controllers.reconciler import WRITTEN_MEMO, reconcile_object
from controllers.trainingjob import reports
from controllers.trainingjob.controller import reconcile
from tests.fakes import FakeKube, Operator

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "trainingjob.yaml"


def gpu_node(name: str, gpus: int) -> dict[str, Any]:
    return {
        "kind": "Node",
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.present": "true"}},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def job(replicas: int = 4) -> dict[str, Any]:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["namespace"] = "ns"
    manifest["spec"]["workers"]["replicas"] = replicas
    return manifest


async def schedule(kube: FakeKube, node_of: dict[str, str]) -> None:
    """What the scheduler and the kubelet would do: bind each worker, then run it."""
    for name, node in node_of.items():
        await kube.patch("Pod", "ns", name, {"spec": {"nodeName": node}})
        await kube.patch_status("Pod", "ns", name, {"phase": "Running"})


@pytest.fixture
def kube(monkeypatch: pytest.MonkeyPatch) -> FakeKube:
    monkeypatch.setenv(tokens.KEY_ENV, "operator-key")
    kube = FakeKube()
    kube.add(gpu_node("gpu-0", 2))
    kube.add(gpu_node("gpu-1", 2))
    return kube


async def test_a_job_starts_as_one_gang_and_settles(kube: FakeKube) -> None:
    kube.add(job())
    async with Operator(kube) as op:
        first = await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        assert first.error is None
        workers = kube.of_kind("Pod")
        assert [p["metadata"]["name"] for p in workers] == [f"gpt-pretrain-worker-{r}" for r in range(4)]
        uid = kube.stored("TrainingJob", "ns", "gpt-pretrain")["metadata"]["uid"]  # type: ignore[index]
        for child in [*workers, *kube.of_kind("Service"), *kube.of_kind("Secret")]:
            assert child["metadata"]["ownerReferences"][0]["uid"] == uid
        ready = op.condition("TrainingJob", "ns", "gpt-pretrain")
        assert (ready["status"], ready["reason"], ready["message"]) == (
            "False",
            "GangStarting",
            "0/4 workers running",
        )
        status = kube.stored("TrainingJob", "ns", "gpt-pretrain")["status"]  # type: ignore[index]
        assert status["reportTokenHash"] == tokens.token_hash(reports.report_token(uid))
        assert status["checkpointIntervalReason"].startswith("auto:")  # decided before any report

        await schedule(kube, {f"gpt-pretrain-worker-{r}": f"gpu-{r // 2}" for r in range(4)})
        running = await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        assert op.condition("TrainingJob", "ns", "gpt-pretrain")["reason"] == "GangRunning"
        assert ("Normal", "GangRunning", "all 4 workers running") in running.events

        # Nothing changed: no status patch, no Event, no write to any child.
        writes = kube.count("apply") + kube.count("create") + kube.count("delete")
        quiet = await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        assert quiet.patch is None and quiet.events == [] and quiet.error is None
        assert kube.count("apply") + kube.count("create") + kube.count("delete") == writes
        # The gang admission read Nodes and Pods from the cache, never by LIST.
        assert kube.count("list", "Node") == 1


async def test_a_gang_that_does_not_fit_waits_and_says_why(kube: FakeKube) -> None:
    kube.add(job(replicas=6))
    async with Operator(kube) as op:
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        ready = op.condition("TrainingJob", "ns", "gpt-pretrain")
        assert ready["reason"] == "InsufficientCapacity"
        assert "6 worker(s) x 1 GPU need 6 GPUs" in ready["message"] and "have 4 free" in ready["message"]
        assert kube.of_kind("Pod") == []  # never a partial gang


async def test_a_reconcile_never_undoes_what_reports_wrote(kube: FakeKube) -> None:
    """One writer per status field: the reconciler read a status older than a report's write."""
    kube.add(job())
    async with Operator(kube) as op:
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        await schedule(kube, {f"gpt-pretrain-worker-{r}": f"gpu-{r // 2}" for r in range(4)})
        await op.settle()
        older = copy.deepcopy(kube.stored("TrainingJob", "ns", "gpt-pretrain"))
        # The report endpoint records progress and a committed checkpoint meanwhile.
        reported = {"currentStep": 42, "latestCheckpoint": {"step": 40, "time": "2026-01-01T00:00:00Z"}}
        await kube.patch_status("TrainingJob", "ns", "gpt-pretrain", reported)
        patch = kopf.Patch()
        await reconcile_object(
            TRAINING_JOB, reconcile, kopf.Body(older), patch, op.memo, logging.getLogger("t"), 0, _ignore
        )
        written = dict(patch["status"])
        assert written["conditions"][0]["reason"] == "GangRunning"
        assert not {"currentStep", "latestCheckpoint", "lastReportTime", "checkpointCost"} & set(written)
        await kube.patch_status("TrainingJob", "ns", "gpt-pretrain", written)
        status = kube.stored("TrainingJob", "ns", "gpt-pretrain")["status"]  # type: ignore[index]
        assert status["currentStep"] == 42 and status["latestCheckpoint"]["step"] == 40


def _ignore(*_: object, **__: object) -> None:
    return None


async def test_api_failures_and_bugs_are_conditions_in_words(kube: FakeKube) -> None:
    kube.add(job())
    async with Operator(kube) as op:
        message = "PATCH services ns/gpt-pretrain: the API server did not answer within 10 s"
        kube.fail("apply", ApiUnavailable(0, message), kind="Service")
        failed = await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        assert isinstance(failed.error, kopf.TemporaryError) and failed.error.delay == 15
        ready = op.condition("TrainingJob", "ns", "gpt-pretrain")
        assert (ready["reason"], ready["message"]) == ("ApiUnavailable", f"{message}; retrying in 15 s")
        assert ("Warning", "ApiUnavailable", f"{message}; retrying in 15 s") in failed.events

        # A bug (here: an exception that is no API error) is worded too, and backs off further.
        kube.fail("apply", AttributeError("'str' object has no attribute 'get'"), kind="Service")  # type: ignore[arg-type]
        bug = await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain", retry=2)
        ready = op.condition("TrainingJob", "ns", "gpt-pretrain")
        assert ready["reason"] == "ReconcileError" and "object has no attribute" not in ready["message"]
        assert ready["message"].endswith("retrying in 60 s") and "AttributeError" in ready["message"]
        assert isinstance(bug.error, kopf.TemporaryError) and bug.error.delay == 60

        # Recovered: the next pass goes on where it stopped.
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        assert op.condition("TrainingJob", "ns", "gpt-pretrain")["reason"] == "GangStarting"


async def test_workers_come_from_the_cache_and_their_changes_wake_the_job(kube: FakeKube) -> None:
    kube.add(job())
    async with Operator(kube) as op:
        lists = kube.count("list", "Pod")  # the cache's first lists
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        await op.settle()
        # The workers' creation woke the job (its own writes: one more pass, which settles).
        assert ("trainingjob", "ns", "gpt-pretrain") in op.wakeups.woken
        await schedule(kube, {f"gpt-pretrain-worker-{r}": f"gpu-{r // 2}" for r in range(4)})
        for _ in range(3):
            quiet = await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        assert quiet.patch is None and quiet.requeue_after is None  # nothing to poll: the resync
        assert kube.count("list", "Pod") == lists  # every pass read the workers from the cache

        # A worker failing wakes the job, and the pass sees it without a LIST.
        op.wakeups.woken.clear()
        await kube.patch_status(
            "Pod", "ns", "gpt-pretrain-worker-1", {"phase": "Failed", "reason": "OOMKilled"}
        )
        await op.settle()
        assert op.wakeups.woken == [("trainingjob", "ns", "gpt-pretrain")]
        restarted = await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        assert op.condition("TrainingJob", "ns", "gpt-pretrain")["message"].startswith(
            "worker gpt-pretrain-worker-1 failed (OOMKilled)"
        )
        assert kube.count("list", "Pod") == lists
        # The next gang waits out the backoff: the pass asks to run again when it ends.
        backing_off = await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        assert restarted.error is None and backing_off.requeue_after is not None
        assert 0 < backing_off.requeue_after <= 30  # the example's failurePolicy.backoff


async def test_a_lost_node_wakes_the_jobs_with_workers_on_it(kube: FakeKube) -> None:
    from controllers.trainingjob.controller import wake_on_node_loss

    kube.add(job())
    async with Operator(kube) as op:
        wake_on_node_loss(op.cache, op.wakeups)
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        await schedule(kube, {f"gpt-pretrain-worker-{r}": f"gpu-{r // 2}" for r in range(4)})
        await op.settle()
        op.wakeups.woken.clear()
        await kube.patch_status("Node", None, "gpu-0", {"allocatable": {"nvidia.com/gpu": "2"}})
        await op.settle()
        assert op.wakeups.woken == []  # a heartbeat of a ready node wakes nobody
        await kube.patch_status(
            "Node", None, "gpu-0", {"conditions": [{"type": "Ready", "status": "Unknown"}]}
        )
        await op.settle()
        assert set(op.wakeups.woken) == {("trainingjob", "ns", "gpt-pretrain")}
        op.wakeups.woken.clear()
        await kube.delete("Node", None, "gpu-1")
        await op.settle()
        assert set(op.wakeups.woken) == {("trainingjob", "ns", "gpt-pretrain")}


async def test_a_pass_right_after_creating_workers_waits_for_the_cache_or_lists(
    kube: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read-your-writes: a cache that has not seen the workers just created must not make the job
    create them again (or count them as lost)."""
    from controllers.trainingjob import controller

    monkeypatch.setattr(controller, "CACHE_WAIT_SECONDS", 0.05)
    kube.add(job())
    async with Operator(kube) as op:
        await op.cache.worker_informer.close()  # the cache's watch of workers stalls from here
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        lists = kube.count("list", "Pod")
        creates = kube.count("apply", "Pod")
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        assert kube.count("list", "Pod") == lists + 1  # the fall-back LIST
        assert kube.count("apply", "Pod") == creates  # no worker created twice
        assert op.condition("TrainingJob", "ns", "gpt-pretrain")["reason"] == "GangStarting"


async def test_a_pass_from_a_stale_body_does_not_count_a_restart(kube: FakeKube) -> None:
    """kopf's view of the job may lag the status patch of the pass before (a template change
    stopped the gang): the next pass reconciles from what that patch returned, not from the view."""
    kube.add(job())
    async with Operator(kube) as op:
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        await schedule(kube, {f"gpt-pretrain-worker-{r}": f"gpu-{r // 2}" for r in range(4)})
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        assert op.condition("TrainingJob", "ns", "gpt-pretrain")["reason"] == "GangRunning"
        stored = kube.stored("TrainingJob", "ns", "gpt-pretrain")
        assert stored is not None
        template = copy.deepcopy(stored["spec"]["template"])
        template.setdefault("metadata", {}).setdefault("labels", {})["changed"] = "yes"
        await kube.patch("TrainingJob", "ns", "gpt-pretrain", {"spec": {"template": template}})
        updated = copy.deepcopy(kube.stored("TrainingJob", "ns", "gpt-pretrain"))
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        assert op.condition("TrainingJob", "ns", "gpt-pretrain")["reason"] == "Updating"
        await op.settle()
        # The next pass gets the body from before the stopping pass's status patch.
        await op.reconcile_body(TRAINING_JOB, reconcile, updated)  # type: ignore[arg-type]
        status = kube.stored("TrainingJob", "ns", "gpt-pretrain")["status"]  # type: ignore[index]
        assert status["restarts"] == 0 and status["gang"] == 1


async def test_the_object_a_status_patch_returned_is_kept_without_managed_fields(kube: FakeKube) -> None:
    """A pass keeps what its status patch returned, one per object (`freshest`), but not the
    managedFields in it: nothing reads them, and they are often the larger part of the object."""
    manifest = job()
    manifest["metadata"]["managedFields"] = [{"manager": "kubectl", "operation": "Update", "fieldsV1": {}}]
    kube.add(manifest)
    async with Operator(kube) as op:
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        written = op.object_memos["ns/gpt-pretrain"][WRITTEN_MEMO]
        stored = kube.stored("TrainingJob", "ns", "gpt-pretrain")
        assert stored is not None and stored["metadata"]["managedFields"]
        assert "managedFields" not in written["metadata"]
        assert written["status"] == stored["status"]
        assert written["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]


async def test_the_interval_has_one_writer_even_when_a_restart_moves_it(kube: FakeKube) -> None:
    """A failure re-decides the interval; a reconcile that read the status before a report's
    measured save must not write an interval decided without it (the endpoint decides it again
    from the status as it is after the reconciler's patch)."""
    from controllers.trainingjob.controller import REPORTS_MEMO

    kube.add(job())
    async with Operator(kube) as op:
        op.memo[REPORTS_MEMO] = reports.ReportEndpoint(kube)
        first = await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        assert first.patch is not None and "checkpointIntervalReason" not in first.patch
        status = kube.stored("TrainingJob", "ns", "gpt-pretrain")["status"]  # type: ignore[index]
        assert status["checkpointIntervalReason"].startswith("auto:")  # the endpoint decided it
        await schedule(kube, {f"gpt-pretrain-worker-{r}": f"gpu-{r // 2}" for r in range(4)})
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        await op.settle()
        older = copy.deepcopy(kube.stored("TrainingJob", "ns", "gpt-pretrain"))
        # Meanwhile a report records a measured save, and a worker fails.
        cost = {"step": 10, "stallSeconds": 2.0, "persistSeconds": 5.0}
        await kube.patch_status("TrainingJob", "ns", "gpt-pretrain", {"checkpointCost": cost})
        await kube.patch_status("Pod", "ns", "gpt-pretrain-worker-0", {"phase": "Failed"})
        await op.settle()
        restart = await op.reconcile_body(TRAINING_JOB, reconcile, older)  # type: ignore[arg-type]
        assert restart.patch is not None and restart.patch["restarts"] == 1
        assert not {"checkpointInterval", "checkpointIntervalReason", "checkpointCost"} & set(restart.patch)
        stored = kube.stored("TrainingJob", "ns", "gpt-pretrain")
        assert stored is not None
        status = stored["status"]
        assert status["checkpointCost"] == cost and status["restarts"] == 1
        spec = TRAINING_JOB.spec.model_validate(stored["spec"])
        fresh = reports.decide_interval(spec, TRAINING_JOB.status.model_validate(status), datetime.now(UTC))
        assert status["checkpointIntervalReason"] == fresh.reason
        assert "until the trainer reports a measured save" not in status["checkpointIntervalReason"]


def pinned_node(pod: dict[str, Any]) -> str:
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return str(terms["nodeSelectorTerms"][0]["matchFields"][0]["values"][0])


async def test_a_worker_whose_reserved_gpus_were_taken_is_placed_again_alone(
    kube: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kube-scheduler can place a pod admission did not see on a reserved node first: only the
    worker left unbound is placed again while GPUs are free elsewhere (its bound peers keep theirs,
    so no GPUs are freed for pending pods to take); with none free the whole gang waits again."""
    from controllers.trainingjob import controller

    kube.add(job())
    async with Operator(kube) as op:
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        pods = {p["metadata"]["name"]: p for p in kube.of_kind("Pod")}
        late = next(n for n, p in pods.items() if pinned_node(p) == "gpu-1" and n.endswith("3"))
        await schedule(kube, {n: pinned_node(p) for n, p in pods.items() if n != late})
        kube.add(
            {
                "kind": "Pod",
                "metadata": {"name": "engine", "namespace": "other"},
                "spec": {
                    "nodeName": "gpu-1",
                    "containers": [{"name": "e", "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
                },
                "status": {"phase": "Running"},
            }
        )
        kube.add(gpu_node("gpu-2", 2))
        monkeypatch.setattr(controller, "BIND_TIMEOUT_SECONDS", 0.0)
        uids = {n: p["metadata"]["uid"] for n, p in pods.items() if n != late}

        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        assert op.condition("TrainingJob", "ns", "gpt-pretrain")["reason"] == "GangUnschedulable"
        assert {
            p["metadata"]["name"]: p["metadata"]["uid"]
            for p in kube.of_kind("Pod")
            if p["metadata"]["name"] != "engine"
        } == uids
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        again = kube.stored("Pod", "ns", late)
        assert again is not None and pinned_node(again) == "gpu-2"
        assert again["metadata"]["labels"]["ampacity.dev/gang"] == "0"
        assert kube.stored("TrainingJob", "ns", "gpt-pretrain")["status"]["restarts"] == 0  # type: ignore[index]

        # No GPUs free anywhere when it times out again: the whole gang gives its GPUs back.
        await kube.delete("Node", None, "gpu-2")
        await op.reconcile(TRAINING_JOB, reconcile, "ns", "gpt-pretrain")
        ready = op.condition("TrainingJob", "ns", "gpt-pretrain")
        assert ready["reason"] == "GangUnschedulable" and "waits for admission again" in ready["message"]
        assert [p["metadata"]["name"] for p in kube.of_kind("Pod")] == ["engine"]
