"""TrainingJob reconciler: the workers start as one gang and stop as one gang.

Each gang is numbered (`status.gang`, AMPACITY_ATTEMPT in the workers) and its pods
carry that number. A pass of the reconciler:

1. makes sure the rendezvous Service and the job's report token Secret exist (the
   operator keeps only the token's hash, `status.reportTokenHash`);
2. deletes pods of earlier gangs and waits until they are gone (worker names are
   reused, and two gangs must never overlap);
3. stops the gang on a resize (`spec.workers.replicas` no longer the gang's world size;
   the SDK reshards the checkpoint on load), on a template change (pods are immutable),
   and on a failure (a worker failed or disappeared, or its node is gone or not ready):
   the failure is counted, the work since the latest complete checkpoint is booked as
   lost, the auto interval is re-decided, and the next gang waits for the backoff
   (`status.restartNotBefore`; the pass does not block);
4. creates a gang only when the free GPUs of the nodes it may run on hold all of it
   (first fit), so a gang is never partly running; otherwise Ready=False,
   InsufficientCapacity. The workers resume from the latest complete checkpoint
   (AMPACITY_RESUME_STEP); a checkpoint counts only once the trainer reported its
   manifest committed (`controllers.trainingjob.reports`).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from ampacity.api import TRAINING_JOB
from ampacity.api.gpu import GPU_RESOURCE, pod_gpus
from ampacity.api.meta import LABEL_PREFIX
from ampacity.api.trainingjob import IntervalPolicy, TrainingJobSpec, TrainingJobStatus, TrainingPhase
from ampacity.training.accounting import lost_gpu_seconds
from controllers import metrics, tokens
from controllers.reconciler import Context, controller
from controllers.trainingjob import reports

RENDEZVOUS_PORT = 29500
GANG_LABEL = f"{LABEL_PREFIX}/gang"
RANK_LABEL = f"{LABEL_PREFIX}/rank"
WORLD_SIZE_LABEL = f"{LABEL_PREFIX}/world-size"
REVISION_LABEL = f"{LABEL_PREFIX}/revision"
CHECKPOINT_MOUNT = "/checkpoints"
TOKEN_MOUNT = "/var/run/ampacity/report"

Object = dict[str, Any]


def worker_name(job: str, rank: int) -> str:
    return f"{job}-worker-{rank}"


def spec_revision(spec: TrainingJobSpec) -> str:
    """A digest of what a running worker cannot change (pods are immutable): a new one needs a new gang.

    The world size is left out (a resize is handled on its own), and so are the interval
    and failure policy, which take effect without a restart, and retention, which the
    next gang picks up.
    """
    fixed = {
        "template": spec.template,
        "gpusPerWorker": spec.workers.gpus_per_worker,
        "storage": spec.checkpoint.storage.to_api(),
        "resume": spec.resume,
    }
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:12]


def worker_pod(ctx: Context, spec: TrainingJobSpec, rank: int, world_size: int, gang: int) -> Object:
    """Worker `rank` of gang number `gang`, with the rendezvous, checkpoint and report environment."""
    template = copy.deepcopy(spec.template)
    pod_spec: dict[str, Any] = template.get("spec", {})
    name = worker_name(ctx.name, rank)
    metadata = ctx.child_metadata(name, "worker")
    metadata["labels"] |= {
        **template.get("metadata", {}).get("labels", {}),
        GANG_LABEL: str(gang),
        RANK_LABEL: str(rank),
        WORLD_SIZE_LABEL: str(world_size),
        REVISION_LABEL: spec_revision(spec),
    }
    storage = spec.checkpoint.storage
    retention = spec.checkpoint.retention
    status: TrainingJobStatus = ctx.status
    env = [
        {"name": "WORLD_SIZE", "value": str(world_size)},
        {"name": "RANK", "value": str(rank)},
        {"name": "MASTER_ADDR", "value": f"{worker_name(ctx.name, 0)}.{ctx.name}"},
        {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "AMPACITY_CHECKPOINT_URI", "value": storage.uri or f"file://{CHECKPOINT_MOUNT}"},
        {"name": "AMPACITY_RESUME", "value": "true" if spec.resume else "false"},
        {"name": "AMPACITY_ATTEMPT", "value": str(gang)},
        {"name": "AMPACITY_JOB_NAMESPACE", "value": ctx.namespace},
        {"name": "AMPACITY_JOB_NAME", "value": ctx.name},
        {"name": "AMPACITY_REPORT_URL", "value": reports.report_url(ctx.namespace, ctx.name)},
        {"name": "AMPACITY_REPORT_TOKEN_FILE", "value": f"{TOKEN_MOUNT}/{reports.TOKEN_KEY}"},
        {"name": "AMPACITY_RETENTION_KEEP_LAST", "value": str(retention.keep_last)},
        {"name": "AMPACITY_RETENTION_KEEP_EVERY", "value": str(retention.keep_every)},
    ]
    if status.checkpoint_interval is not None:
        env.append(
            {"name": "AMPACITY_CHECKPOINT_INTERVAL_SECONDS", "value": f"{status.checkpoint_interval:g}"}
        )
    latest = status.latest_checkpoint
    if spec.resume and latest is not None:
        env.append({"name": "AMPACITY_RESUME_STEP", "value": str(latest.step)})
    names = {v["name"] for v in env}
    containers = pod_spec.setdefault("containers", [])
    for index, container in enumerate(containers):
        container["env"] = [e for e in container.get("env", []) if e.get("name") not in names] + env
        if index == 0 and spec.workers.gpus_per_worker:
            limits = container.setdefault("resources", {}).setdefault("limits", {})
            limits[GPU_RESOURCE] = str(spec.workers.gpus_per_worker)
    volumes = pod_spec.setdefault("volumes", [])
    # The token as a file, not an env var: it stays out of `kubectl describe` and may rotate.
    volumes.append(
        {
            "name": "ampacity-report-token",
            "secret": {"secretName": reports.token_secret_name(ctx.name), "defaultMode": 0o400},
        }
    )
    mounts = [{"name": "ampacity-report-token", "mountPath": TOKEN_MOUNT, "readOnly": True}]
    if storage.persistent_volume_claim:
        volumes.append(
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": storage.persistent_volume_claim}}
        )
        mounts.append({"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT})
    for container in containers:
        container.setdefault("volumeMounts", []).extend(copy.deepcopy(mounts))
    # The operator restarts the gang as a whole; a worker restarting alone would rejoin a dead rendezvous.
    pod_spec["restartPolicy"] = "Never"
    pod_spec["hostname"] = name
    pod_spec["subdomain"] = ctx.name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def rendezvous_service(ctx: Context) -> Object:
    """Headless Service giving each worker a stable DNS name for rendezvous."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.child_metadata(ctx.name, "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {**ctx.child_labels("worker")},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}],
        },
    }


def token_secret(ctx: Context, token: str) -> Object:
    """The job's report token, owned by the job; workers present it to the report endpoint."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": ctx.child_metadata(reports.token_secret_name(ctx.name), "report-token"),
        "type": "Opaque",
        "data": {reports.TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


async def issue_token(ctx: Context) -> str:
    """Write the job's report token Secret unless the status says it holds it; return the token's hash.

    The token is derived from the operator key and the job's uid (`controllers.tokens`, the scheme
    of every kind). The operator may create and delete Secrets but not read them: a Secret whose
    hash the status lost, or one written under an earlier key, is replaced, and the workers'
    mounted copy follows (the SDK re-reads the token file on every report).
    """
    token = reports.report_token(str(ctx.body.metadata.uid))
    status: TrainingJobStatus = ctx.status
    return await tokens.write_secret(ctx.kube, token_secret(ctx, token), token, status.report_token_hash)


# --- gang admission ------------------------------------------------------------------------------


def _tolerated(taint: Mapping[str, Any], tolerations: Iterable[Mapping[str, Any]]) -> bool:
    if taint.get("effect") == "PreferNoSchedule":
        return True
    for toleration in tolerations:
        if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
            continue
        if toleration.get("operator") == "Exists" and not toleration.get("key"):
            return True
        if toleration.get("key") != taint.get("key"):
            continue
        if toleration.get("operator") == "Exists" or toleration.get("value") == taint.get("value"):
            return True
    return False


def node_matches(node: Mapping[str, Any], pod_spec: Mapping[str, Any]) -> bool:
    """Whether a worker could be placed on `node`: schedulable, nodeSelector, taints tolerated.

    Node affinity is not evaluated; the scheduler still has the last word.
    """
    if node.get("spec", {}).get("unschedulable"):
        return False
    labels = node.get("metadata", {}).get("labels", {})
    if any(labels.get(k) != v for k, v in pod_spec.get("nodeSelector", {}).items()):
        return False
    tolerations = pod_spec.get("tolerations", [])
    return all(_tolerated(t, tolerations) for t in node.get("spec", {}).get("taints", []))


def free_gpus(nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Allocatable GPUs minus what the pods bound to each node hold (finished pods hold none)."""
    free = {
        node["metadata"]["name"]: int(node.get("status", {}).get("allocatable", {}).get(GPU_RESOURCE, 0))
        for node in nodes
    }
    for pod in pods:
        node_name = pod.get("spec", {}).get("nodeName")
        if node_name in free and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
            free[node_name] -= pod_gpus(pod)
    return free


def first_fit(free: Mapping[str, int], workers: int, gpus_per_worker: int) -> bool:
    """Whether `workers` workers of `gpus_per_worker` GPUs each fit, placed first-fit."""
    if gpus_per_worker <= 0:
        return True
    left = dict(free)
    for _ in range(workers):
        node = next((n for n, gpus in left.items() if gpus >= gpus_per_worker), None)
        if node is None:
            return False
        left[node] -= gpus_per_worker
    return True


async def gang_fits(ctx: Context, spec: TrainingJobSpec, workers: int) -> tuple[bool, str]:
    """Whether `workers` more workers fit on the matching nodes now; and what capacity there is."""
    gpus = spec.workers.gpus_per_worker
    if gpus <= 0 or workers <= 0:
        return True, ""
    pod_spec = spec.template.get("spec", {})
    nodes = [n for n in await ctx.cache.nodes() if node_matches(n, pod_spec)]
    free = free_gpus(nodes, await ctx.cache.pods())  # the bound, unfinished pods: those holding GPUs
    usable = {n: g for n, g in free.items() if g > 0}
    fits = first_fit(free, workers, gpus)
    capacity = (
        f"{workers} worker(s) x {gpus} GPU need {workers * gpus} GPUs, at most {gpus} on one node; "
        f"{len(nodes)} matching node(s) have {sum(usable.values())} free "
        f"({', '.join(f'{n}: {g}' for n, g in sorted(usable.items())) or 'none'})"
    )
    return fits, capacity


# --- accounting ----------------------------------------------------------------------------------


def resume_step(spec: TrainingJobSpec, status: TrainingJobStatus) -> int:
    latest = status.latest_checkpoint
    return latest.step if spec.resume and latest is not None else 0


def work_lost(spec: TrainingJobSpec, status: TrainingJobStatus) -> float:
    """GPU-seconds a failure of the current gang costs: steps since the checkpoint, plus the backoff."""
    gpus = status.replicas * spec.workers.gpus_per_worker
    if gpus <= 0:
        return 0.0
    resumed = resume_step(spec, status)
    return lost_gpu_seconds(
        failed_at_step=max(status.current_step, resumed),
        resumed_from_step=resumed,
        step_seconds=status.step_seconds or 0.0,
        restart_seconds=spec.failure_policy.backoff,
        gpus=gpus,
    )


def close_exposure(status: TrainingJobStatus, now: datetime) -> None:
    """Fold the stopped gang's node-hours into the exposure the failure rate is estimated over."""
    status.exposure_node_hours = reports.exposure_node_hours(status, now)
    status.gang_start_time = None


# --- the reconciler ------------------------------------------------------------------------------


def interval_stale(spec: TrainingJobSpec, status: TrainingJobStatus) -> bool:
    """Whether the interval in status is missing or was decided under another policy (or `every`)."""
    interval = spec.checkpoint.interval
    if status.checkpoint_interval is None:
        return True
    was_fixed = status.checkpoint_interval_reason.startswith("fixed")
    if interval.policy == IntervalPolicy.FIXED:
        return not was_fixed or status.checkpoint_interval != interval.every
    return was_fixed


def node_ready(node: Mapping[str, Any]) -> bool:
    """A node is lost when its Ready condition is False or Unknown (no heartbeat); no condition: ready."""
    for cond in node.get("status", {}).get("conditions", []):
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return True


def broken_workers(
    pods: Iterable[Mapping[str, Any]], nodes: Mapping[str, Mapping[str, Any] | None]
) -> list[str]:
    """Why the gang must stop: workers that failed, or whose node is gone or not ready."""
    why = []
    for pod in sorted(pods, key=lambda p: str(p["metadata"]["name"])):
        name = pod["metadata"]["name"]
        node_name = pod.get("spec", {}).get("nodeName")
        node = nodes.get(node_name) if node_name else None
        if _phase(pod) == "Failed":
            reason = pod.get("status", {}).get("reason")
            why.append(f"worker {name} failed" + (f" ({reason})" if reason else ""))
        elif _terminating(pod) or node_name not in nodes:
            continue
        elif node is None:
            why.append(f"node {node_name} of worker {name} is gone")
        elif not node_ready(node):
            why.append(f"node {node_name} of worker {name} is not ready")
    return why


def _phase(pod: Mapping[str, Any]) -> str:
    return str(pod.get("status", {}).get("phase", "Pending"))


def _terminating(pod: Mapping[str, Any]) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


async def reconcile(ctx: Context) -> None:
    status: TrainingJobStatus = ctx.status
    # One writer per status field: the report endpoint's fields go into this pass's status patch
    # only when this pass decided them anew (a new gang's starting step, a re-decided interval).
    reported = status.model_dump(include=set(reports.REPORT_FIELDS))
    await _reconcile(ctx, datetime.now(UTC))
    decided = status.model_dump(include=set(reports.REPORT_FIELDS))
    ctx.status_fields_not_owned = {f for f in reports.REPORT_FIELDS if decided[f] == reported[f]}
    metrics.TRAINING_JOB_GPU_SECONDS_LOST.labels(ctx.namespace, ctx.name).set(status.gpu_seconds_lost)
    if status.latest_checkpoint is not None:
        metrics.TRAINING_JOB_LAST_CHECKPOINT.labels(ctx.namespace, ctx.name).set(
            status.latest_checkpoint.time.timestamp()
        )
    if status.checkpoint_interval is not None:
        metrics.TRAINING_JOB_CHECKPOINT_INTERVAL.labels(ctx.namespace, ctx.name).set(
            status.checkpoint_interval
        )


async def _reconcile(ctx: Context, now: datetime) -> None:
    spec: TrainingJobSpec = ctx.spec
    status: TrainingJobStatus = ctx.status
    status.selector = ctx.selector()
    if interval_stale(spec, status):
        reports.set_interval(spec, status, now)
    if status.phase in (TrainingPhase.SUCCEEDED, TrainingPhase.FAILED):
        return
    world_size = spec.workers.replicas
    await ctx.apply(rendezvous_service(ctx))
    status.report_token_hash = await issue_token(ctx)

    pods = await ctx.kube.list_objects("Pod", ctx.namespace, ctx.selector())
    current = [p for p in pods if p["metadata"]["labels"].get(GANG_LABEL) == str(status.gang)]
    stale = [p for p in pods if p not in current]
    for pod in stale:
        if not _terminating(pod):
            await ctx.kube.delete("Pod", ctx.namespace, pod["metadata"]["name"])
    live = [p for p in current if not _terminating(p)]

    sizes = {p["metadata"]["labels"].get(WORLD_SIZE_LABEL) for p in current}
    if sizes - {str(world_size)} or status.replicas not in (0, world_size):
        await _resize_gang(ctx, spec, current, world_size, now)
        return
    revision = spec_revision(spec)
    if {p["metadata"]["labels"].get(REVISION_LABEL, revision) for p in current} - {revision}:
        await _stop_gang(ctx, current, now)
        status.phase = TrainingPhase.RESTARTING
        message = f"the worker template changed; the new gang resumes from step {resume_step(spec, status)}"
        ctx.set_ready(False, "Updating", message)
        ctx.event("Updated", message)
        return
    bound = {p["spec"]["nodeName"] for p in live if p.get("spec", {}).get("nodeName")}
    nodes = {name: await ctx.cache.node(name) for name in sorted(bound)}
    failures = broken_workers(current, nodes)
    # Every worker of the gang was created: from now on a missing one is a failure.
    created = status.replicas == world_size
    if failures:
        await _restart_gang(ctx, spec, current, "; ".join(failures), now)
        return
    if created and len(live) < world_size:
        await _restart_gang(ctx, spec, current, f"{world_size - len(live)} worker(s) disappeared", now)
        return
    if created and all(_phase(p) == "Succeeded" for p in live):
        status.phase = TrainingPhase.SUCCEEDED
        close_exposure(status, now)
        ctx.set_ready(True, "Succeeded", f"all {world_size} workers completed")
        return

    if not created:
        if not await _start_gang(ctx, spec, pods, current, world_size, now):
            return
        live = [
            p
            for p in await ctx.kube.list_objects("Pod", ctx.namespace, ctx.selector())
            if p["metadata"]["labels"].get(GANG_LABEL) == str(status.gang) and not _terminating(p)
        ]

    running = [p for p in live if _phase(p) == "Running"]
    metrics.TRAINING_JOB_WORKERS.labels(ctx.namespace, ctx.name).set(len(running))
    metrics.TRAINING_JOB_RESTARTS.labels(ctx.namespace, ctx.name).set(status.restarts)
    if len(running) == world_size:
        if status.phase != TrainingPhase.RUNNING or status.gang_start_time is None:
            status.gang_start_time = now
            status.nodes = len({p.get("spec", {}).get("nodeName") for p in running} - {None})
        status.phase = TrainingPhase.RUNNING
        ctx.set_ready(True, "GangRunning", f"all {world_size} workers running")
    else:
        status.phase = TrainingPhase.PENDING if status.gang == 0 else TrainingPhase.RESTARTING
        ctx.set_ready(False, "GangStarting", f"{len(running)}/{world_size} workers running")


async def _start_gang(
    ctx: Context,
    spec: TrainingJobSpec,
    pods: list[Object],
    current: list[Object],
    world_size: int,
    now: datetime,
) -> bool:
    """Create the gang's missing workers if the whole gang may start now; False when it may not."""
    status: TrainingJobStatus = ctx.status
    waiting = TrainingPhase.PENDING if status.gang == 0 else TrainingPhase.RESTARTING
    if len(pods) > len(current):
        status.phase = waiting
        ctx.set_ready(False, "StoppingPreviousGang", f"waiting for {len(pods) - len(current)} old worker(s)")
        return False
    if status.restart_not_before is not None and now < status.restart_not_before:
        status.phase = waiting
        left = (status.restart_not_before - now).total_seconds()
        ctx.set_ready(False, "BackingOff", f"restarting the gang in {left:.0f}s (failurePolicy.backoff)")
        return False
    existing = {p["metadata"]["name"] for p in current}
    missing = [r for r in range(world_size) if worker_name(ctx.name, r) not in existing]
    fits, capacity = await gang_fits(ctx, spec, len(missing))
    if not fits:
        status.phase = waiting
        status.replicas = 0
        ctx.set_ready(False, "InsufficientCapacity", f"gang not started: {capacity}")
        return False
    if not current:
        # A new gang: its progress starts where it resumes.
        status.current_step = resume_step(spec, status)
    for rank in missing:
        await ctx.kube.apply(worker_pod(ctx, spec, rank, world_size, status.gang))
    status.replicas = world_size
    status.restart_not_before = None
    return True


async def _stop_gang(ctx: Context, pods: list[Object], now: datetime) -> None:
    status: TrainingJobStatus = ctx.status
    for pod in pods:
        if not _terminating(pod):
            await ctx.kube.delete("Pod", ctx.namespace, pod["metadata"]["name"])
    close_exposure(status, now)
    status.gang += 1
    status.replicas = 0


async def _resize_gang(
    ctx: Context, spec: TrainingJobSpec, pods: list[Object], world_size: int, now: datetime
) -> None:
    status: TrainingJobStatus = ctx.status
    sizes = {p["metadata"]["labels"].get(WORLD_SIZE_LABEL) for p in pods} - {None}
    before = next(iter(sizes)) if sizes else str(ctx.status.replicas)
    await _stop_gang(ctx, pods, now)
    resume = resume_step(spec, status)
    status.phase = TrainingPhase.RESTARTING
    ctx.set_ready(False, "Resizing", f"world size {before} -> {world_size}, resuming from step {resume}")
    ctx.event("Resized", f"world size {before} -> {world_size}; the new gang resumes from step {resume}")


async def _restart_gang(
    ctx: Context, spec: TrainingJobSpec, pods: list[Object], why: str, now: datetime
) -> None:
    status: TrainingJobStatus = ctx.status
    lost = work_lost(spec, status)
    await _stop_gang(ctx, pods, now)
    if status.restarts >= spec.failure_policy.max_restarts:
        status.phase = TrainingPhase.FAILED
        ctx.set_ready(
            False,
            "RestartLimitReached",
            f"{why}; {status.restarts} restarts used of {spec.failure_policy.max_restarts}",
        )
        return
    status.restarts += 1
    status.gpu_seconds_lost += lost
    status.restart_not_before = now + timedelta(seconds=spec.failure_policy.backoff)
    status.phase = TrainingPhase.RESTARTING
    # One more observed failure moves the failure rate, hence the auto interval.
    reports.set_interval(spec, status, now)
    resume = resume_step(spec, status)
    ctx.set_ready(False, "GangRestarting", f"{why}; restarting all workers from step {resume}")
    ctx.event(
        "GangRestart",
        f"{why}; restart {status.restarts} resumes from step {resume} after "
        f"{spec.failure_policy.backoff:g}s; {lost:.0f} GPU-seconds lost",
        warning=True,
    )


#: A worker failure is noticed within this many seconds (the gang's pods are not watched).
REFRESH_SECONDS = 5.0

controller(TRAINING_JOB, reconcile, interval=REFRESH_SECONDS)


@kopf.on.delete(
    TRAINING_JOB.group, TRAINING_JOB.version, TRAINING_JOB.plural, id="forget-reports", optional=True
)
def _forget_reports(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    endpoint = memo.get("reports")
    if isinstance(endpoint, reports.ReportEndpoint):
        endpoint.forget(str(body.metadata.uid), str(body.metadata.namespace), str(body.metadata.name))
