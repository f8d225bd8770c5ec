"""TrainingJob against the real control plane, with this test process playing the trainer.

kwok marks worker pods Running without running anything, so the test does what the
workers would: it saves checkpoints with the SDK into a temporary directory (the shared
checkpoint volume) and reports them with the SDK's `Reporter` to the operator's report
endpoint, authenticated with the job's own token.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ampacity.dev.cluster.kubectl import Kubectl, condition, reconciled
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.nodes import GpuNodeShape, gpu_node
from ampacity.dev.cluster.polling import wait_for
from ampacity.training.sdk import (
    AsyncCheckpointer,
    Reporter,
    SaveResult,
    latest_complete,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    shard_array,
)
from ampacity.training.sdk.layout import even_shard, retention_from_env
from controllers.trainingjob.reports import report_path, token_hash

SELECTOR = "ampacity.dev/trainingjob"
WEIGHTS = np.arange(96, dtype=np.float32).reshape(24, 4)
BIAS = np.arange(5, dtype=np.float64)


def manifest(
    name: str,
    namespace: str,
    replicas: int,
    *,
    gpus: int = 1,
    min_: int | None = None,
    max_: int | None = None,
) -> dict[str, Any]:
    workers: dict[str, Any] = {"replicas": replicas, "gpusPerWorker": gpus}
    if min_ is not None:
        workers["minReplicas"] = min_
    if max_ is not None:
        workers["maxReplicas"] = max_
    return {
        "apiVersion": "ampacity.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "workers": workers,
            "template": {"spec": {"containers": [{"name": "trainer", "image": "trainer:test"}]}},
            "checkpoint": {
                "storage": {"uri": "s3://checkpoints/llm"},
                "interval": {"policy": "auto"},
                "retention": {"keepLast": 2, "keepEvery": 30},
            },
            "failurePolicy": {"maxRestarts": 5, "backoff": "1s"},
        },
    }


def job(kubectl: Kubectl, name: str, namespace: str) -> dict[str, Any]:
    obj = kubectl.get("trainingjob", name, namespace)
    assert obj is not None
    return obj


def running(kubectl: Kubectl, name: str, namespace: str, gang: int, timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = kubectl.get("trainingjob", name, namespace)
        if reconciled(obj) and obj["status"].get("phase") == "Running" and obj["status"]["gang"] == gang:  # type: ignore[index]
            return obj
        return None

    return wait_for(check, timeout=timeout, what=f"gang {gang} of {name} running")


def worker_envs(kubectl: Kubectl, name: str, namespace: str) -> dict[str, dict[str, str]]:
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", f"{SELECTOR}={name}")["items"]
    return {
        p["metadata"]["name"]: {e["name"]: e.get("value", "") for e in p["spec"]["containers"][0]["env"]}
        for p in pods
        if not p["metadata"].get("deletionTimestamp")
    }


def token(kubectl: Kubectl, name: str, namespace: str) -> str:
    secret = wait_for(
        lambda: kubectl.get("secret", f"{name}-report-token", namespace), what="report token Secret"
    )
    assert secret is not None
    return base64.b64decode(secret["data"]["token"]).decode()


def reporter(
    operator: LocalOperator,
    kubectl: Kubectl,
    name: str,
    namespace: str,
    rank: int,
    world_size: int,
    attempt: int,
    secret: str | None = None,
) -> Reporter:
    return Reporter(
        operator.report_url + report_path(namespace, name),
        namespace=namespace,
        job=name,
        token=secret or token(kubectl, name, namespace),
        rank=rank,
        world_size=world_size,
        attempt=attempt,
    )


def save_all(
    root: Path, step: int, world_size: int, attempt: int, ranks: range | None = None
) -> list[SaveResult]:
    """Every rank of a gang (or only `ranks`: the others crashed) saves its shard of the state."""
    results = []
    for rank in ranks if ranks is not None else range(world_size):
        shard, spec = shard_array(WEIGHTS, world_size, rank)
        results.append(
            save_checkpoint(
                root,
                step,
                {"w": shard, "b": BIAS},
                rank=rank,
                world_size=world_size,
                shards={"w": spec},
                attempt=attempt,
            )
        )
    return results


def report_all(
    operator: LocalOperator,
    kubectl: Kubectl,
    name: str,
    namespace: str,
    results: list[SaveResult],
    world_size: int,
    attempt: int,
    step_seconds: float | None = None,
) -> None:
    secret = token(kubectl, name, namespace)
    for rank, result in enumerate(results):
        with reporter(operator, kubectl, name, namespace, rank, world_size, attempt, secret) as r:
            r.send(r.build(result.step, checkpoint=result, step_seconds=step_seconds))


def test_gang_starts_together_with_its_environment(
    kubectl: Kubectl, operator: LocalOperator, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert kubectl.apply(manifest("llm", namespace, 4)).returncode == 0
    obj = running(kubectl, "llm", namespace, gang=0)
    assert condition(obj)["reason"] == "GangRunning"  # type: ignore[index]
    assert obj["status"]["replicas"] == 4
    assert obj["status"]["checkpointIntervalReason"].startswith("auto:")
    envs = worker_envs(kubectl, "llm", namespace)
    assert sorted(envs) == [f"llm-worker-{r}" for r in range(4)]
    assert sorted(e["RANK"] for e in envs.values()) == ["0", "1", "2", "3"]
    for env in envs.values():
        assert env["WORLD_SIZE"] == "4"
        assert env["MASTER_ADDR"] == "llm-worker-0.llm"
        # torchrun's own variables: a bare `torchrun train.py` joins the same 4-pod group.
        assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"]) == ("4", "1")
        assert env["PET_MASTER_ADDR"] == "llm-worker-0.llm" and env["PET_NODE_RANK"] == env["RANK"]
        assert env["AMPACITY_ATTEMPT"] == "0"
        assert env["AMPACITY_JOB_NAME"] == "llm"
        assert env["AMPACITY_REPORT_URL"].endswith(report_path(namespace, "llm"))
        assert "AMPACITY_RESUME_STEP" not in env  # nothing to resume from yet
    service = kubectl.json("get", "service", "llm", "-n", namespace)
    assert service["spec"]["clusterIP"] == "None"
    pod = kubectl.json("get", "pod", "llm-worker-0", "-n", namespace)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["ampacity-report-token"]["secret"]["secretName"] == "llm-report-token"
    secret = kubectl.json("get", "secret", "llm-report-token", "-n", namespace)
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "TrainingJob"
    # The operator keeps only the token's hash; it never reads the Secret back.
    assert obj["status"]["reportTokenHash"] == token_hash(token(kubectl, "llm", namespace))

    # A wrong token is refused and changes nothing.
    before = job(kubectl, "llm", namespace)["status"]
    with (
        reporter(operator, kubectl, "llm", namespace, 0, 4, 0, secret="not-the-token") as r,
        pytest.raises(httpx.HTTPStatusError) as refused,
    ):
        r.send(r.build(500, step_seconds=1.0))
    assert refused.value.response.status_code == 401
    after = job(kubectl, "llm", namespace)["status"]
    assert after["currentStep"] == before["currentStep"] == 0
    assert after.get("lastReportTime") is None

    # auto interval: Young/Daly from the reported save stall; the persist time floors it.
    first = save_all(tmp_path, 10, 4, attempt=0)
    with reporter(operator, kubectl, "llm", namespace, 0, 4, 0) as r:
        fast = r.send(r.build(10, checkpoint=_with_cost(first[3], stall=0.5, persist=2.0)))
        assert fast is not None and fast.reason is not None
        assert "Daly" in fast.reason
        slow = r.send(r.build(20, checkpoint=_with_cost(first[3], step=20, stall=0.5, persist=50_000.0)))
        assert slow is not None and slow.checkpoint_interval_seconds == 50_000.0
        assert slow.reason is not None and "persist" in slow.reason
    assert fast.checkpoint_interval_seconds is not None and fast.checkpoint_interval_seconds < 50_000
    status = wait_for(
        lambda: (
            (s := job(kubectl, "llm", namespace)["status"]).get("checkpointCost", {}).get("step") == 20 and s
        ),
        what="interval re-evaluated",
    )
    assert status["checkpointInterval"] == "13h53m20s"
    assert "raised to the persist time" in status["checkpointIntervalReason"]
    # Only the committed save of step 10 counts; step 20's report was of an uncommitted save.
    assert status["latestCheckpoint"]["step"] == 10
    assert status["currentStep"] == 20

    # Retention, as the workers run it: rank 0 applies the policy the job put in its environment.
    env = envs["llm-worker-0"]
    monkeypatch.setenv("AMPACITY_RETENTION_KEEP_LAST", env["AMPACITY_RETENTION_KEEP_LAST"])
    monkeypatch.setenv("AMPACITY_RETENTION_KEEP_EVERY", env["AMPACITY_RETENTION_KEEP_EVERY"])
    assert retention_from_env() is not None
    save_all(tmp_path, 15, 2, attempt=0, ranks=range(1))  # torn: rank 1 never saved step 15
    with AsyncCheckpointer(tmp_path, rank=0, world_size=1, attempt=0) as ckpt:
        for step in (20, 30, 40, 50, 60):
            ckpt.save(step, {"b": BIAS})
            ckpt.wait()
    save_all(tmp_path, 70, 2, attempt=0, ranks=range(1))  # newer and still "persisting"
    kept = {c.step: c.complete for c in list_checkpoints(tmp_path)}
    # keepLast 2 -> 50, 60; keepEvery 30 -> the first at or after each multiple: 10, 30, 60; 70 in flight.
    assert kept == {10: True, 30: True, 50: True, 60: True, 70: False}
    assert latest_complete(tmp_path) == tmp_path / "step-000000000060"


def _with_cost(result: SaveResult, *, stall: float, persist: float, step: int | None = None) -> SaveResult:
    return replace(
        result,
        step=result.step if step is None else step,
        stall_seconds=stall,
        persist_seconds=persist,
        committed=result.committed and step is None,
    )


def test_failed_worker_restarts_gang_from_latest_complete_checkpoint(
    kubectl: Kubectl, operator: LocalOperator, namespace: str, tmp_path: Path
) -> None:
    assert kubectl.apply(manifest("llm", namespace, 4)).returncode == 0
    running(kubectl, "llm", namespace, gang=0)

    complete = save_all(tmp_path, 100, 4, attempt=0)
    assert [r.committed for r in complete] == [False, False, False, True]
    report_all(operator, kubectl, "llm", namespace, complete, 4, attempt=0, step_seconds=2.0)
    # Step 200 is torn: rank 3 crashed before writing its part, so no manifest was committed.
    torn = save_all(tmp_path, 200, 4, attempt=0, ranks=range(3))
    assert not any(r.committed for r in torn)
    report_all(operator, kubectl, "llm", namespace, torn, 4, attempt=0, step_seconds=2.0)
    with reporter(operator, kubectl, "llm", namespace, 0, 4, 0) as r:
        r.send(r.build(230, step_seconds=2.0))
    status = wait_for(
        lambda: (s := job(kubectl, "llm", namespace)["status"]).get("currentStep") == 230 and s,
        what="progress recorded",
    )
    assert status["latestCheckpoint"]["step"] == 100
    assert latest_complete(tmp_path) == tmp_path / "step-000000000100"

    kubectl("delete", "pod", "llm-worker-2", "-n", namespace, "--wait=false")
    obj = running(kubectl, "llm", namespace, gang=1, timeout=90)
    assert obj["status"]["restarts"] == 1
    # Lost: 130 steps of 2 s redone plus the 1 s backoff, on 4 GPUs.
    assert obj["status"]["gpuSecondsLost"] == pytest.approx((230 - 100) * 2.0 * 4 + 1.0 * 4)
    envs = worker_envs(kubectl, "llm", namespace)
    assert len(envs) == 4
    assert {e["AMPACITY_RESUME_STEP"] for e in envs.values()} == {"100"}
    assert {e["AMPACITY_ATTEMPT"] for e in envs.values()} == {"1"}
    events = kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=llm")
    assert "GangRestart" in events

    # The restarted gang resumes from the complete step, and a late report of the dead gang
    # does not move its progress.
    resumed = load_checkpoint(tmp_path, rank=0, world_size=4)
    assert resumed.step == 100
    with reporter(operator, kubectl, "llm", namespace, 1, 4, 0) as r:
        r.send(r.build(240))
    assert job(kubectl, "llm", namespace)["status"]["currentStep"] == 100


def test_resize_restarts_at_new_world_size_from_checkpoint(
    kubectl: Kubectl, operator: LocalOperator, namespace: str, tmp_path: Path
) -> None:
    assert kubectl.apply(manifest("llm", namespace, 4, min_=2, max_=4)).returncode == 0
    running(kubectl, "llm", namespace, gang=0)
    results = save_all(tmp_path, 300, 4, attempt=0)
    report_all(operator, kubectl, "llm", namespace, results, 4, attempt=0)
    wait_for(
        lambda: (job(kubectl, "llm", namespace)["status"].get("latestCheckpoint") or {}).get("step") == 300,
        what="checkpoint recorded",
    )

    refused = kubectl.run("scale", "trainingjob/llm", "-n", namespace, "--replicas=5")
    assert refused.returncode != 0 and "maxReplicas" in refused.stderr
    kubectl("scale", "trainingjob/llm", "-n", namespace, "--replicas=2")
    obj = running(kubectl, "llm", namespace, gang=1)
    assert obj["status"]["replicas"] == 2
    assert obj["status"]["restarts"] == 0  # a resize is not a failure
    envs = worker_envs(kubectl, "llm", namespace)
    assert sorted(envs) == ["llm-worker-0", "llm-worker-1"]
    assert {e["WORLD_SIZE"] for e in envs.values()} == {"2"}
    assert {e["AMPACITY_RESUME_STEP"] for e in envs.values()} == {"300"}
    events = kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=llm")
    assert "Resized" in events

    # A new worker template needs new pods: a new gang, not a failure.
    patch = '{"spec": {"template": {"spec": {"containers": [{"name": "trainer", "image": "trainer:v2"}]}}}}'
    kubectl("patch", "trainingjob", "llm", "-n", namespace, "--type=merge", "-p", patch)
    obj = running(kubectl, "llm", namespace, gang=2)
    assert obj["status"]["restarts"] == 0
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", f"{SELECTOR}=llm")["items"]
    assert {p["spec"]["containers"][0]["image"] for p in pods} == {"trainer:v2"}
    assert "Updated" in kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=llm"
    )

    # The 4-rank checkpoint loads exactly at world size 2.
    for rank in range(2):
        loaded = load_checkpoint(tmp_path, rank=rank, world_size=2)
        assert loaded.step == 300 and loaded.saved_world_size == 4
        np.testing.assert_array_equal(loaded.state["w"], WEIGHTS[even_shard(WEIGHTS.shape, 2, rank).slices()])
        np.testing.assert_array_equal(loaded.state["b"], BIAS)


def test_gang_that_does_not_fit_is_not_started(
    kubectl: Kubectl, operator: LocalOperator, namespace: str
) -> None:
    # 6 workers x 8 GPUs on four 8-GPU nodes: four would fit, so none may start.
    assert kubectl.apply(manifest("big", namespace, 6, gpus=8)).returncode == 0

    def explained() -> dict[str, Any] | None:
        o = kubectl.get("trainingjob", "big", namespace)
        ready = condition(o) if reconciled(o) else None
        return o if ready and ready["reason"] == "InsufficientCapacity" else None

    obj = wait_for(explained, what="capacity explained")
    assert obj is not None
    assert "48 GPUs" in condition(obj)["message"]  # type: ignore[index]
    assert obj["status"]["replicas"] == 0
    assert not kubectl.json("get", "pods", "-n", namespace, "-l", f"{SELECTOR}=big")["items"]


def test_lost_node_restarts_the_gang(kubectl: Kubectl, operator: LocalOperator, namespace: str) -> None:
    # A node of this test's own, so losing it disturbs nothing else.
    node = gpu_node(f"gpu-node-{namespace}", 99, GpuNodeShape())
    node["metadata"]["labels"]["ampacity.dev/test-pool"] = namespace
    kubectl("create", "-f", "-", stdin=json.dumps(node))
    try:
        job = manifest("llm", namespace, 2, gpus=4)
        job["spec"]["template"]["spec"]["nodeSelector"] = {"ampacity.dev/test-pool": namespace}
        assert kubectl.apply(job).returncode == 0
        running(kubectl, "llm", namespace, gang=0)
        pods = kubectl.json("get", "pods", "-n", namespace, "-l", f"{SELECTOR}=llm")["items"]
        assert {p["spec"]["nodeName"] for p in pods} == {node["metadata"]["name"]}

        kubectl("delete", "node", node["metadata"]["name"], "--wait=false")
        obj = wait_for(
            lambda: (o := job_status(kubectl, "llm", namespace)) and o["status"].get("restarts") == 1 and o,
            timeout=60,
            what="gang stopped after its node was lost",
        )
        assert obj["status"]["gang"] == 1
        assert obj["status"]["gpuSecondsLost"] > 0
        events = kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=llm")
        assert f"node {node['metadata']['name']} of worker llm-worker-0 is gone" in events
        # No node matches any more: the next gang waits rather than starting in part.
        assert condition(obj)["reason"] in ("GangRestarting", "StoppingPreviousGang", "BackingOff")  # type: ignore[index]
    finally:
        kubectl.run("delete", "node", node["metadata"]["name"], "--ignore-not-found")


def job_status(kubectl: Kubectl, name: str, namespace: str) -> dict[str, Any] | None:
    obj = kubectl.get("trainingjob", name, namespace)
    return obj if reconciled(obj) else None


def test_concurrent_gangs_beyond_capacity_never_deadlock_or_overcommit(
    kubectl: Kubectl, operator: LocalOperator, namespace: str
) -> None:
    """Ten jobs asking for 76 GPUs at once on four 8-GPU nodes of this test's own (32 GPUs)."""
    pool = {"ampacity.dev/test-pool": namespace}
    nodes = [gpu_node(f"gang-{namespace}-{i}", 200 + i, GpuNodeShape()) for i in range(4)]
    for node in nodes:
        node["metadata"]["labels"] |= pool
        # Tainted: other tests' pods stay off these nodes, and admission must honour the toleration.
        node["spec"]["taints"] = [
            {"key": "ampacity.dev/test-pool", "value": namespace, "effect": "NoSchedule"}
        ]
        kubectl("create", "-f", "-", stdin=json.dumps(node))
    names = {n["metadata"]["name"] for n in nodes}
    shapes = [(2, 4), (1, 8), (3, 4), (2, 8), (1, 4), (4, 2), (2, 4), (1, 8), (3, 2), (2, 4)]
    assert sum(w * g for w, g in shapes) > 32

    def settled(done: set[str]) -> set[str] | None:
        """The jobs now running, once every job not `done` runs its whole gang (every pod bound) or
        waits with its place in a line that is in creation order; None while that does not hold.
        GPUs are never over-committed, checked on every look."""
        pods = [
            p
            for p in kubectl.json("get", "pods", "-n", namespace)["items"]
            if not p["metadata"].get("deletionTimestamp")
        ]
        used: dict[str, int] = {}
        for p in pods:
            if node := p["spec"].get("nodeName"):
                gpus = int(p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                used[node] = used.get(node, 0) + gpus
        assert set(used) <= names and all(gpus <= 8 for gpus in used.values()), used
        running_jobs, line = set(), []
        for i in range(len(shapes)):
            if f"j{i}" in done:
                continue
            obj = kubectl.get("trainingjob", f"j{i}", namespace)
            if not reconciled(obj):
                return None
            assert obj is not None
            status, ready = obj["status"], condition(obj)
            gang = [p for p in pods if p["metadata"]["labels"].get(SELECTOR) == f"j{i}"]
            if status.get("phase") == "Running":
                if len(gang) != shapes[i][0] or not all(p["spec"].get("nodeName") for p in gang):
                    return None
                running_jobs.add(f"j{i}")
            elif ready and ready["reason"] == "InsufficientCapacity" and status.get("queuePosition"):
                line.append((status["queuePosition"], i))
            else:
                return None
        if any(p["metadata"]["labels"].get(SELECTOR) in done for p in pods):
            return None  # the finished jobs' pods are still going
        # All priority 0: the line is in creation order, numbered from 1.
        if sorted(line) != [(n + 1, i) for n, i in enumerate(sorted(i for _, i in line))]:
            return None
        return running_jobs

    try:
        for i, (workers, gpus) in enumerate(shapes):
            job_manifest = manifest(f"j{i}", namespace, workers, gpus=gpus)
            template = job_manifest["spec"]["template"]["spec"]
            template["nodeSelector"] = pool
            template["tolerations"] = [{"key": "ampacity.dev/test-pool", "operator": "Exists"}]
            assert kubectl.apply(job_manifest).returncode == 0
        ran: set[str] = set()
        for _ in range(len(shapes)):
            running_now = wait_for(
                lambda done=frozenset(ran): settled(set(done)),  # type: ignore[misc]
                timeout=180,
                what="every job running its whole gang or waiting in line, in order",
            )
            if not ran:
                assert len(running_now) < len(shapes)  # demand exceeds capacity: some wait
            ran |= running_now
            if len(ran) == len(shapes):
                break
            # The running jobs finish (deleted here): the waiting ones move up and start in order.
            for name in sorted(running_now):
                kubectl.run(
                    "delete", "trainingjob", name, "-n", namespace, "--ignore-not-found", "--wait=false"
                )
        assert len(ran) == len(shapes)
    finally:
        for node in nodes:
            kubectl.run("delete", "node", node["metadata"]["name"], "--ignore-not-found")


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ({"uri": "minio://b/p"}, "checkpoint.storage.uri must start with s3://, gs://, gcs:// or file://"),
        ({"uri": "gs://b/p", "endpoint": "https://x"}, "checkpoint.storage.endpoint is for an s3:// uri"),
        (
            {"persistentVolumeClaim": "ckpt", "credentialsSecret": "s3"},
            "checkpoint.storage.credentialsSecret is for an object-store uri",
        ),
    ],
)
def test_bad_checkpoint_storage_is_refused_with_a_clear_message(
    kubectl: Kubectl, crds: None, namespace: str, storage: dict[str, str], message: str
) -> None:
    job_manifest = manifest("bad", namespace, 1)
    job_manifest["spec"]["checkpoint"]["storage"] = storage
    result = kubectl.apply(job_manifest)
    assert result.returncode != 0 and message in result.stderr
    assert kubectl.get("trainingjob", "bad", namespace) is None
