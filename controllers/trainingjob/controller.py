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

The workers are read from the operator's cache (`ClusterCache.workers`), whose watch wakes the
job when one changes, as does a node of a worker going away or not ready (`wake_on_node_loss`);
a pass right after creating workers waits until the cache has seen them, or LISTs them.
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
from ampacity.api.gpu import GPU_RESOURCE
from ampacity.api.meta import LABEL_PREFIX
from ampacity.api.trainingjob import IntervalPolicy, TrainingJobSpec, TrainingJobStatus, TrainingPhase
from ampacity.training.accounting import lost_gpu_seconds
from ampacity.training.admission import GangRequest, Waiting, decide_admission
from ampacity.training.rendezvous import RENDEZVOUS_PORT, master_address, rendezvous_env, worker_name
from controllers import metrics, tokens
from controllers.cache import ClusterCache, Informer
from controllers.reconciler import WRITTEN_MEMO, Context, controller
from controllers.trainingjob import reports
from controllers.trainingjob.admission import Reservation, gang_admission
from controllers.trainingjob.history import cluster_history
from controllers.wakeups import Wakeups

GANG_LABEL = f"{LABEL_PREFIX}/gang"
RANK_LABEL = f"{LABEL_PREFIX}/rank"
WORLD_SIZE_LABEL = f"{LABEL_PREFIX}/world-size"
REVISION_LABEL = f"{LABEL_PREFIX}/revision"
CHECKPOINT_MOUNT = "/checkpoints"
TOKEN_MOUNT = "/var/run/ampacity/report"
#: Where a gs:// job's credentials Secret is mounted: Google's clients read a key *file*.
GCS_KEY_MOUNT = "/var/run/ampacity/gcs"
GCS_KEY = "key.json"

Object = dict[str, Any]


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


def worker_pod(
    ctx: Context, spec: TrainingJobSpec, rank: int, world_size: int, gang: int, node: str = ""
) -> Object:
    """Worker `rank` of gang number `gang`, with the rendezvous, checkpoint and report environment,
    pinned to `node` when admission reserved one for it."""
    template = copy.deepcopy(spec.template)
    pod_spec: dict[str, Any] = template.get("spec", {})
    if node:
        pin_to_node(pod_spec, node)
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
    rendezvous = rendezvous_env(
        rank=rank,
        world_size=world_size,
        gpus_per_worker=spec.workers.gpus_per_worker,
        master_addr=master_address(ctx.name),
    )
    env = [
        *({"name": k, "value": v} for k, v in rendezvous.items()),
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
    if storage.endpoint:
        env.append({"name": "AMPACITY_CHECKPOINT_ENDPOINT", "value": storage.endpoint})
    gcs_key = storage.credentials_secret is not None and (storage.uri or "").startswith(("gs://", "gcs://"))
    if gcs_key:
        env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{GCS_KEY_MOUNT}/{GCS_KEY}"})
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
        if storage.credentials_secret and not gcs_key:
            # The store's own client reads its credentials from the environment; the kubelet
            # injects them from the job's Secret, which the operator never reads.
            container.setdefault("envFrom", []).append({"secretRef": {"name": storage.credentials_secret}})
        if index == 0:
            ports = container.setdefault("ports", [])
            if all(p.get("containerPort") != RENDEZVOUS_PORT for p in ports):
                ports.append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT})
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
    if gcs_key:
        volumes.append(
            {
                "name": "checkpoint-credentials",
                "secret": {
                    "secretName": storage.credentials_secret,
                    "items": [{"key": GCS_KEY, "path": GCS_KEY}],
                    "defaultMode": 0o400,
                },
            }
        )
        mounts.append({"name": "checkpoint-credentials", "mountPath": GCS_KEY_MOUNT, "readOnly": True})
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


def pin_to_node(pod_spec: dict[str, Any], node: str) -> None:
    """Require the node admission reserved for this worker (ANDed into every node affinity term)."""
    required = (
        pod_spec.setdefault("affinity", {})
        .setdefault("nodeAffinity", {})
        .setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    )
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({})
    for term in terms:
        term.setdefault("matchFields", []).append(
            {"key": "metadata.name", "operator": "In", "values": [node]}
        )


def gang_request(ctx: Context, spec: TrainingJobSpec, workers: int) -> GangRequest:
    created = ctx.body.metadata.get("creationTimestamp")
    return GangRequest(
        key=f"{ctx.namespace}/{ctx.name}",
        created=datetime.fromisoformat(created.replace("Z", "+00:00")) if created else datetime.now(UTC),
        priority=spec.priority,
        workers=workers,
        gpus_per_worker=spec.workers.gpus_per_worker,
        pod_spec=spec.template.get("spec", {}),
    )


async def admit(ctx: Context, spec: TrainingJobSpec, ranks: list[int]) -> dict[int, str] | Waiting:
    """The node of each of `ranks` if this gang is admitted now (its reservation), else where it waits.

    Under the operator-wide lock: decide over the cache's nodes and bound pods and the
    reservations of gangs admitted before, and reserve every gang the decision admits.
    """
    admission = gang_admission(ctx.memo)
    key = f"{ctx.namespace}/{ctx.name}"
    names = {rank: worker_name(ctx.name, rank) for rank in ranks}
    async with admission.lock:
        if key not in admission.reservations:
            admission.waiting[key] = (gang_request(ctx, spec, len(ranks)), list(names.values()))
            bound = await ctx.cache.pods()
            decision = decide_admission(
                await ctx.cache.nodes(),
                bound,
                admission.reserved(bound),
                [request for request, _ in admission.waiting.values()],
            )
            for admitted in decision.admitted.values():
                request, pods = admission.waiting.pop(admitted.key)
                admission.reservations[admitted.key] = Reservation(
                    {
                        pod: (node, request.gpus_per_worker)
                        for pod, node in zip(pods, admitted.nodes, strict=True)
                    }
                )
            if key not in admission.reservations:
                return decision.waiting[key]
        reserved = admission.reservations[key].pods
        return {rank: reserved[name][0] for rank, name in names.items() if name in reserved}


#: Per-object memo: the resourceVersion of the last worker this job created.
WORKERS_WRITTEN_MEMO = "workers_written"
#: How long a pass waits for the cache to show the workers the last one created before a LIST.
CACHE_WAIT_SECONDS = 2.0


async def workers(ctx: Context) -> list[Object]:
    """The job's worker pods from the cache, read-your-writes: once the cache has seen the workers
    the job last created (it usually has: their events woke this pass), else from a LIST."""
    written = ctx.memo.get(WORKERS_WRITTEN_MEMO)
    if written and not await ctx.cache.worker_informer.wait_for_version(written, CACHE_WAIT_SECONDS):
        return await ctx.kube.list_objects("Pod", ctx.namespace, ctx.selector())
    return await ctx.cache.workers(ctx.namespace, ctx.selector())


def bind_due(pods: Iterable[Mapping[str, Any]], now: datetime) -> float | None:
    """Seconds until the first unbound worker has waited BIND_TIMEOUT_SECONDS (None: all bound)."""
    due = []
    for pod in pods:
        created = pod["metadata"].get("creationTimestamp")
        if created and not pod.get("spec", {}).get("nodeName") and not _terminating(pod):
            waited = (now - datetime.fromisoformat(created.replace("Z", "+00:00"))).total_seconds()
            due.append(max(0.0, BIND_TIMEOUT_SECONDS - waited))
    return min(due) if due else None


def unbound_too_long(pods: Iterable[Mapping[str, Any]], now: datetime) -> list[str]:
    """Workers still not bound to a node BIND_TIMEOUT_SECONDS after they were created."""
    late = []
    for pod in pods:
        if pod.get("spec", {}).get("nodeName") or _terminating(pod):
            continue
        created = pod["metadata"].get("creationTimestamp")
        if created and (now - datetime.fromisoformat(created.replace("Z", "+00:00"))).total_seconds() > (
            BIND_TIMEOUT_SECONDS
        ):
            late.append(pod["metadata"]["name"])
    return sorted(late)


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


#: Per-object memo: this pass decided the interval again (a failure, a policy change).
REDECIDED_MEMO = "interval_redecided"


def redecide_interval(ctx: Context, spec: TrainingJobSpec, now: datetime) -> None:
    """Decide the interval in this pass's status (the new gang's environment carries it) and
    have the report endpoint, its writer, decide it again once this pass's status is written."""
    reports.set_interval(spec, ctx.status, now)
    ctx.memo[REDECIDED_MEMO] = True


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
    endpoint = ctx.memo.get(REPORTS_MEMO)
    if isinstance(endpoint, reports.ReportEndpoint):
        # The interval has one writer, the endpoint: this pass's decision only set the new gang's
        # environment; the endpoint decides again from the status this pass writes.
        if ctx.memo.pop(REDECIDED_MEMO, False):

            async def redecide() -> None:
                await endpoint.redecide_interval(ctx.namespace, ctx.name, ctx.memo.get(WRITTEN_MEMO))

            ctx.after_status.append(redecide)
        ctx.status_fields_not_owned |= reports.INTERVAL_FIELDS
    metrics.TRAINING_JOB_GPU_SECONDS_LOST.labels(ctx.namespace, ctx.name).set(status.gpu_seconds_lost)
    reports.export_metrics(ctx.namespace, ctx.name, status)


async def _reconcile(ctx: Context, now: datetime) -> None:
    spec: TrainingJobSpec = ctx.spec
    status: TrainingJobStatus = ctx.status
    status.selector = ctx.selector()
    others_failed, others_ran = cluster_history(ctx.memo).record(
        f"{ctx.namespace}/{ctx.name}", status.restarts, reports.exposure_node_hours(status, now)
    )
    # Two significant figures: the prior barely moves below that, and the status is not
    # rewritten every pass while the other gangs run.
    status.cluster_failures, status.cluster_exposure_node_hours = others_failed, float(f"{others_ran:.2g}")
    if interval_stale(spec, status):
        redecide_interval(ctx, spec, now)
    if status.phase in (TrainingPhase.SUCCEEDED, TrainingPhase.FAILED):
        gang_admission(ctx.memo).forget(f"{ctx.namespace}/{ctx.name}")
        return
    world_size = spec.workers.replicas
    await ctx.apply(rendezvous_service(ctx))
    status.report_token_hash = await issue_token(ctx)

    pods = await workers(ctx)
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
    late = unbound_too_long(live, now) if created else []
    due = bind_due(live, now) if created else None
    if due is not None:
        ctx.requeue(due)
    if late:
        await _place_again(ctx, spec, current, late, now)
        return
    if created and all(_phase(p) == "Succeeded" for p in live):
        status.phase = TrainingPhase.SUCCEEDED
        close_exposure(status, now)
        ctx.set_ready(True, "Succeeded", f"all {world_size} workers completed")
        return

    if not created:
        started = await _start_gang(ctx, spec, pods, current, world_size, now)
        if started is None:
            return
        live = [*live, *started]

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
) -> list[Object] | None:
    """Create the gang's missing workers if the whole gang may start now (returns them as created);
    None when it may not."""
    status: TrainingJobStatus = ctx.status
    waiting = TrainingPhase.PENDING if status.gang == 0 else TrainingPhase.RESTARTING
    if len(pods) > len(current):
        status.phase = waiting
        ctx.set_ready(False, "StoppingPreviousGang", f"waiting for {len(pods) - len(current)} old worker(s)")
        return None
    if status.restart_not_before is not None and now < status.restart_not_before:
        status.phase = waiting
        left = (status.restart_not_before - now).total_seconds()
        ctx.set_ready(False, "BackingOff", f"restarting the gang in {left:.0f}s (failurePolicy.backoff)")
        ctx.requeue(left)
        return None
    going = [p for p in current if _terminating(p)]
    if going:
        # Workers of this gang placed again (`_place_again`): their names are reused.
        status.phase = waiting
        ctx.set_ready(False, "GangUnschedulable", f"waiting for {len(going)} unscheduled worker(s) to go")
        return None
    existing = {p["metadata"]["name"] for p in current}
    missing = [r for r in range(world_size) if worker_name(ctx.name, r) not in existing]
    placement = await admit(ctx, spec, missing)
    if isinstance(placement, Waiting) or len(placement) < len(missing):
        if not isinstance(placement, Waiting):
            # A reservation for other workers than these (an earlier gang's): decide again.
            gang_admission(ctx.memo).forget(f"{ctx.namespace}/{ctx.name}")
            placement = Waiting(f"{ctx.namespace}/{ctx.name}", None, "admission is being decided again")
        status.phase = waiting
        status.replicas = 0
        status.queue_position = placement.position
        place = f"number {placement.position} in line" if placement.position else "not in line"
        ctx.set_ready(False, "InsufficientCapacity", f"gang not started, {place}: {placement.reason}")
        # GPUs are freed by other gangs' workers ending or going away, which wake those jobs, not
        # this one: look again soon.
        ctx.requeue(ADMISSION_RETRY_SECONDS)
        return None
    status.queue_position = None
    if not current:
        # A new gang: its progress starts where it resumes.
        status.current_step = resume_step(spec, status)
    started = [
        await ctx.kube.apply(worker_pod(ctx, spec, rank, world_size, status.gang, node=placement[rank]))
        for rank in missing
    ]
    # resourceVersions are decimal numbers (etcd revisions): the longer one is the later.
    ctx.memo[WORKERS_WRITTEN_MEMO] = max(
        (p["metadata"].get("resourceVersion", "") for p in started), key=lambda v: (len(v), v)
    )
    status.replicas = world_size
    status.restart_not_before = None
    return started


async def _place_again(
    ctx: Context, spec: TrainingJobSpec, current: list[Object], late: list[str], now: datetime
) -> None:
    """Admission's reservation did not hold for the `late` workers (the kube-scheduler placed a pod
    admission could not see on their nodes first); not a failure of the job.

    If admission finds their GPUs elsewhere now, only they are deleted, to be created again on the
    new reservation, and the bound workers keep their GPUs and wait in the rendezvous. Stopping the
    whole gang freed GPUs that pending pods took in turn, and at 400 jobs beside 300 pools that kept
    every gang restarting at idle (docs/results/operator.md). If not, the whole gang gives its GPUs
    back and waits for admission: a partial gang never holds GPUs while it waits."""
    status: TrainingJobStatus = ctx.status
    gang_admission(ctx.memo).forget(f"{ctx.namespace}/{ctx.name}")
    message = f"{len(late)} worker(s) not scheduled within {BIND_TIMEOUT_SECONDS:g}s ({', '.join(late)})"
    ranks = sorted(int(p["metadata"]["labels"][RANK_LABEL]) for p in current if p["metadata"]["name"] in late)
    placement = await admit(ctx, spec, ranks)
    if isinstance(placement, Waiting) or len(placement) < len(ranks):
        await _stop_gang(ctx, current, now)
        ctx.set_ready(False, "GangUnschedulable", f"{message}; the gang waits for admission again")
    else:
        for name in late:
            await ctx.kube.delete("Pod", ctx.namespace, name)
        status.replicas = 0
        ctx.set_ready(False, "GangUnschedulable", f"{message}; placing them again")
    status.phase = TrainingPhase.PENDING if status.restarts == 0 else TrainingPhase.RESTARTING
    ctx.event("GangUnschedulable", message, warning=True)


async def _stop_gang(ctx: Context, pods: list[Object], now: datetime) -> None:
    status: TrainingJobStatus = ctx.status
    gang_admission(ctx.memo).forget(f"{ctx.namespace}/{ctx.name}")
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
    redecide_interval(ctx, spec, now)
    resume = resume_step(spec, status)
    ctx.set_ready(False, "GangRestarting", f"{why}; restarting all workers from step {resume}")
    ctx.event(
        "GangRestart",
        f"{why}; restart {status.restarts} resumes from step {resume} after "
        f"{spec.failure_policy.backoff:g}s; {lost:.0f} GPU-seconds lost",
        warning=True,
    )


#: Where the operator keeps the report endpoint in kopf's memo (`controllers.settings`).
REPORTS_MEMO = "reports"

#: An admitted gang whose workers are not all bound this long after creation gives its GPUs back.
BIND_TIMEOUT_SECONDS = 120.0

#: A gang waiting for GPUs asks admission again this often.
ADMISSION_RETRY_SECONDS = 10.0


class NodeLossWakeups:
    """A cache listener on Nodes: a node deleted or no longer Ready wakes the jobs with workers on it
    (their pods may not change for a while: the pod garbage collector takes its time)."""

    def __init__(self, worker_informer: Informer, wakeups: Wakeups) -> None:
        self.worker_informer, self.wakeups = worker_informer, wakeups
        self._ready: dict[str, bool] = {}

    def __call__(self, kind: str, node: Object) -> None:
        name = str(node["metadata"]["name"])
        ready = kind != "DELETED" and node_ready(node)
        was = self._ready.get(name, True)
        if kind == "DELETED":
            self._ready.pop(name, None)
        else:
            self._ready[name] = ready
        if ready or not was:
            return
        for pod in self.worker_informer.objects.values():
            if pod.get("spec", {}).get("nodeName") == name:
                self.wakeups.child_changed("Pod", pod)


def wake_on_node_loss(cache: ClusterCache, wakeups: Wakeups) -> None:
    cache.node_informer.listeners.append(NodeLossWakeups(cache.worker_informer, wakeups))


def _forget_reports(body: kopf.Body, memo: kopf.Memo) -> None:
    """A deleted job's trainer tokens and its place in admission's line go with it."""
    endpoint = memo.get(REPORTS_MEMO)
    if isinstance(endpoint, reports.ReportEndpoint):
        endpoint.forget(str(body.metadata.uid), str(body.metadata.namespace), str(body.metadata.name))
    gang_admission(memo).forget(f"{body.metadata.namespace}/{body.metadata.name}")


controller(TRAINING_JOB, reconcile, forget=_forget_reports)
