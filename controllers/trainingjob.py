"""TrainingJob reconciler: start the workers as one gang, restart the whole gang when one fails."""

from __future__ import annotations

import copy
from typing import Any

from ampacity.api import TRAINING_JOB
from ampacity.api.meta import LABEL_PREFIX
from ampacity.api.trainingjob import TrainingJobSpec, TrainingPhase
from ampacity.cluster.nodes import GPU_RESOURCE
from controllers import metrics
from controllers.reconciler import Context, controller

RENDEZVOUS_PORT = 29500
GANG_LABEL = f"{LABEL_PREFIX}/gang"
RANK_LABEL = f"{LABEL_PREFIX}/rank"
CHECKPOINT_MOUNT = "/checkpoints"


def worker_pod(ctx: Context, spec: TrainingJobSpec, rank: int, world_size: int, gang: int) -> dict[str, Any]:
    """Worker `rank` of gang number `gang`, with the rendezvous and checkpoint environment."""
    template = copy.deepcopy(spec.template)
    pod_spec: dict[str, Any] = template.get("spec", {})
    name = f"{ctx.name}-worker-{rank}"
    metadata = ctx.child_metadata(name, "worker")
    metadata["labels"] |= {
        **template.get("metadata", {}).get("labels", {}),
        GANG_LABEL: str(gang),
        RANK_LABEL: str(rank),
    }
    storage = spec.checkpoint.storage
    env = [
        {"name": "WORLD_SIZE", "value": str(world_size)},
        {"name": "RANK", "value": str(rank)},
        {"name": "MASTER_ADDR", "value": f"{ctx.name}-worker-0.{ctx.name}"},
        {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "AMPACITY_CHECKPOINT_URI", "value": storage.uri or f"file://{CHECKPOINT_MOUNT}"},
        {"name": "AMPACITY_RESUME", "value": "true" if spec.resume else "false"},
    ]
    latest = ctx.status.latest_checkpoint
    if spec.resume and latest is not None:
        env.append({"name": "AMPACITY_RESUME_STEP", "value": str(latest.step)})
    containers = pod_spec.setdefault("containers", [])
    for index, container in enumerate(containers):
        container["env"] = [
            e for e in container.get("env", []) if e.get("name") not in {v["name"] for v in env}
        ] + env
        if index == 0 and spec.workers.gpus_per_worker:
            limits = container.setdefault("resources", {}).setdefault("limits", {})
            limits[GPU_RESOURCE] = str(spec.workers.gpus_per_worker)
    if storage.persistent_volume_claim:
        pod_spec.setdefault("volumes", []).append(
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": storage.persistent_volume_claim}}
        )
        for container in containers:
            container.setdefault("volumeMounts", []).append(
                {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT}
            )
    # The operator restarts the gang as a whole; a worker restarting alone would rejoin a dead rendezvous.
    pod_spec["restartPolicy"] = "Never"
    pod_spec["hostname"] = name
    pod_spec["subdomain"] = ctx.name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def rendezvous_service(ctx: Context) -> dict[str, Any]:
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


async def reconcile(ctx: Context) -> None:
    spec: TrainingJobSpec = ctx.spec
    status = ctx.status
    status.selector = ctx.selector()
    if status.phase in (TrainingPhase.SUCCEEDED, TrainingPhase.FAILED):
        return
    world_size = spec.workers.replicas
    gang = status.restarts
    await ctx.kube.apply(rendezvous_service(ctx))
    pods = await ctx.kube.list_objects("Pod", ctx.namespace, ctx.selector())
    current = [p for p in pods if p["metadata"]["labels"].get(GANG_LABEL) == str(gang)]
    stale = [p for p in pods if p not in current]
    for pod in stale:
        await ctx.kube.delete("Pod", ctx.namespace, pod["metadata"]["name"])

    phases = [p.get("status", {}).get("phase", "Pending") for p in current]
    started = bool(current) and not any(p["metadata"].get("deletionTimestamp") for p in current)
    if started and "Failed" in phases:
        failed = [p["metadata"]["name"] for p in current if p.get("status", {}).get("phase") == "Failed"]
        await _restart_gang(ctx, spec, current, f"worker {', '.join(failed)} failed")
        return
    if started and len(current) < world_size and status.phase == TrainingPhase.RUNNING:
        await _restart_gang(ctx, spec, current, f"{world_size - len(current)} worker(s) disappeared")
        return
    if current and all(phase == "Succeeded" for phase in phases) and len(current) == world_size:
        status.phase = TrainingPhase.SUCCEEDED
        ctx.set_ready(True, "Succeeded", f"all {world_size} workers completed")
        return

    # Create the whole gang in one pass; applying an existing worker is a no-op.
    for rank in range(world_size):
        await ctx.kube.apply(worker_pod(ctx, spec, rank, world_size, gang))
    running = phases.count("Running") if len(current) == world_size else 0
    status.replicas = world_size
    metrics.TRAINING_JOB_WORKERS.labels(ctx.namespace, ctx.name).set(running)
    metrics.TRAINING_JOB_RESTARTS.labels(ctx.namespace, ctx.name).set(status.restarts)
    if running == world_size:
        status.phase = TrainingPhase.RUNNING
        ctx.set_ready(True, "GangRunning", f"all {world_size} workers running")
    else:
        status.phase = TrainingPhase.PENDING if status.restarts == 0 else TrainingPhase.RESTARTING
        ctx.set_ready(False, "GangStarting", f"{running}/{world_size} workers running")


async def _restart_gang(ctx: Context, spec: TrainingJobSpec, pods: list[dict[str, Any]], why: str) -> None:
    status = ctx.status
    for pod in pods:
        await ctx.kube.delete("Pod", ctx.namespace, pod["metadata"]["name"])
    if status.restarts >= spec.failure_policy.max_restarts:
        status.phase = TrainingPhase.FAILED
        ctx.set_ready(
            False,
            "RestartLimitReached",
            f"{why}; {status.restarts} restarts used of {spec.failure_policy.max_restarts}",
        )
        return
    status.restarts += 1
    status.phase = TrainingPhase.RESTARTING
    resume = status.latest_checkpoint.step if status.latest_checkpoint else 0
    ctx.set_ready(False, "GangRestarting", f"{why}; restarting all workers from step {resume}")
    ctx.event("GangRestart", f"{why}; restart {status.restarts} resumes from step {resume}", warning=True)


controller(TRAINING_JOB, reconcile)
