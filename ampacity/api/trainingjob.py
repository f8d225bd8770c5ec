"""TrainingJob: gang-scheduled distributed training with checkpoint orchestration."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum

from pydantic import Field

from ampacity.api.meta import ApiModel, Duration, NameLimit, PositiveDuration, Status, cel
from ampacity.api.podtemplate import PodTemplateSpec
from ampacity.api.resource import Resource, age_column, ready_column, reason_column

#: Most workers a job may have: ranks then have at most five digits, which the name limit counts on.
MAX_WORKERS = 100_000


class Workers(ApiModel):
    """How many workers run, and the elastic range the operator may resize within."""

    replicas: int = Field(ge=1, le=MAX_WORKERS, description="Number of workers (pods) in the gang.")
    min_replicas: int | None = Field(
        default=None,
        ge=1,
        le=MAX_WORKERS,
        description="Smallest world size the job may shrink to (defaults to replicas).",
    )
    max_replicas: int | None = Field(
        default=None,
        ge=1,
        le=MAX_WORKERS,
        description="Largest world size the job may grow to (defaults to replicas).",
    )
    gpus_per_worker: int = Field(default=1, ge=0, description="nvidia.com/gpu requested by each worker.")

    validations = (
        cel(
            "!has(self.minReplicas) || self.minReplicas <= self.replicas",
            "workers.minReplicas must not exceed workers.replicas",
            ".minReplicas",
            check=lambda s: s.min_replicas is None or s.min_replicas <= s.replicas,
        ),
        cel(
            "!has(self.maxReplicas) || self.replicas <= self.maxReplicas",
            "workers.replicas must not exceed workers.maxReplicas",
            ".maxReplicas",
            check=lambda s: s.max_replicas is None or s.replicas <= s.max_replicas,
        ),
    )


#: The checkpoint stores the SDK writes through (fsspec): one pattern for the API server and the operator.
STORAGE_URI_PATTERN = "^(s3|gs|gcs|file)://.+"


class CheckpointStorage(ApiModel):
    """Where checkpoints are written: exactly one of a PVC or an object-store URI."""

    persistent_volume_claim: str | None = Field(
        default=None, min_length=1, description="Name of a PVC mounted into every worker at /checkpoints."
    )
    uri: str | None = Field(
        default=None,
        min_length=1,
        description="Checkpoint URI: s3://bucket/prefix, gs://bucket/prefix, or file:///path on storage "
        "every worker mounts; workers read it as AMPACITY_CHECKPOINT_URI.",
    )
    endpoint: str | None = Field(
        default=None,
        min_length=1,
        description="Endpoint of an S3-compatible store (e.g. https://minio.storage:9000); unset for AWS S3. "
        "Workers read it as AMPACITY_CHECKPOINT_ENDPOINT.",
    )
    credentials_secret: str | None = Field(
        default=None,
        min_length=1,
        description="Name of a Secret in the job's namespace with the store's credentials; the operator "
        "never reads it. For s3:// its keys become the workers' environment (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY); for gs:// its key.json (a service-account key) is mounted and named by "
        "GOOGLE_APPLICATION_CREDENTIALS. Leave it out where the node's identity grants access "
        "(GKE Workload Identity, IRSA).",
    )

    validations = (
        cel(
            "has(self.persistentVolumeClaim) != has(self.uri)",
            "checkpoint.storage needs exactly one of persistentVolumeClaim or uri",
            check=lambda s: (s.persistent_volume_claim is None) != (s.uri is None),
        ),
        cel(
            f"!has(self.uri) || self.uri.matches('{STORAGE_URI_PATTERN}')",
            "checkpoint.storage.uri must start with s3://, gs://, gcs:// or file://",
            ".uri",
            check=lambda s: s.uri is None or re.match(STORAGE_URI_PATTERN, s.uri) is not None,
        ),
        cel(
            "!has(self.endpoint) || (has(self.uri) && self.uri.startsWith('s3://'))",
            "checkpoint.storage.endpoint is for an s3:// uri",
            ".endpoint",
            check=lambda s: s.endpoint is None or (s.uri is not None and s.uri.startswith("s3://")),
        ),
        cel(
            "!has(self.credentialsSecret) || has(self.uri)",
            "checkpoint.storage.credentialsSecret is for an object-store uri",
            ".credentialsSecret",
            check=lambda s: s.credentials_secret is None or s.uri is not None,
        ),
    )


class IntervalPolicy(StrEnum):
    FIXED = "fixed"
    AUTO = "auto"


class CheckpointInterval(ApiModel):
    """How often to checkpoint."""

    policy: IntervalPolicy = Field(
        default=IntervalPolicy.AUTO,
        description="fixed: every `every`; auto: Young/Daly from measured checkpoint cost and failure rate.",
    )
    every: PositiveDuration | None = Field(
        default=None, description="Interval for the fixed policy, e.g. 30m."
    )

    validations = (
        cel(
            "self.policy != 'fixed' || has(self.every)",
            "checkpoint.interval.every is required when policy is fixed",
            ".every",
            check=lambda s: s.policy != "fixed" or s.every is not None,
        ),
    )


class Retention(ApiModel):
    """Which complete checkpoints to keep; the latest complete one is always kept."""

    keep_last: int = Field(default=3, ge=1, description="Keep the newest N complete checkpoints.")
    keep_every: int = Field(
        default=0, ge=0, description="Also keep every Kth checkpoint step for the record (0: none)."
    )


class Checkpointing(ApiModel):
    """Checkpoint orchestration."""

    storage: CheckpointStorage = Field(description="Where checkpoints are written.")
    interval: CheckpointInterval = Field(
        default_factory=lambda: CheckpointInterval(), description="How often to checkpoint."
    )
    retention: Retention = Field(
        default_factory=lambda: Retention(), description="Which checkpoints to keep."
    )


class FailurePolicy(ApiModel):
    """What to do when a worker or its node fails."""

    max_restarts: int = Field(default=10, ge=0, description="Gang restarts allowed before the job fails.")
    backoff: Duration = Field(default=10.0, description="Wait before restarting the gang, e.g. 30s.")


class TrainingJobSpec(ApiModel):
    """Desired state of a TrainingJob."""

    workers: Workers = Field(description="Worker count and elastic range.")
    template: PodTemplateSpec = Field(
        description="Pod template (a core/v1 PodTemplateSpec) for every worker; the operator adds rank, "
        "world size, rendezvous address and checkpoint environment variables.",
    )
    checkpoint: Checkpointing = Field(description="Checkpoint orchestration.")
    failure_policy: FailurePolicy = Field(
        default_factory=lambda: FailurePolicy(), description="Failure handling."
    )
    resume: bool = Field(
        default=True, description="Resume from the latest complete checkpoint when starting."
    )
    priority: int = Field(
        default=0,
        description="Among gangs waiting for GPUs, created at the same time, the higher priority starts "
        "first (waiting gangs are served oldest first).",
    )


class TrainingPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class CheckpointRecord(ApiModel):
    """A complete checkpoint."""

    step: int = Field(ge=0, description="Training step the checkpoint holds.")
    time: datetime = Field(description="When its manifest was committed.")
    size_bytes: int = Field(default=0, ge=0, description="Bytes written.")
    stall_seconds: float = Field(default=0, ge=0, description="Time training was blocked by the save.")
    persist_seconds: float = Field(default=0, ge=0, description="Time to persist it in the background.")


class CheckpointCost(ApiModel):
    """The save cost the trainer measured on its latest checkpoint (slowest rank reported)."""

    step: int = Field(ge=0, description="Checkpoint step the measurement comes from.")
    stall_seconds: float = Field(ge=0, description="Time training was blocked by the save.")
    persist_seconds: float = Field(ge=0, description="Time the background persist and commit took.")


class TrainingJobStatus(Status):
    """Observed state of a TrainingJob."""

    phase: TrainingPhase = Field(default=TrainingPhase.PENDING, description="Lifecycle phase.")
    replicas: int = Field(default=0, ge=0, description="Workers in the running gang (world size).")
    selector: str = Field(
        default="", description="Label selector of the worker pods (for the scale subresource)."
    )
    current_step: int = Field(default=0, ge=0, description="Latest training step reported.")
    latest_checkpoint: CheckpointRecord | None = Field(
        default=None, description="Latest complete checkpoint."
    )
    checkpoint_interval: Duration | None = Field(default=None, description="Checkpoint interval in force.")
    checkpoint_interval_reason: str = Field(default="", description="Why that interval.")
    restarts: int = Field(default=0, ge=0, description="Gang restarts so far.")
    gpu_seconds_lost: float = Field(default=0, ge=0, description="GPU-seconds of work lost to failures.")
    gang: int = Field(
        default=0,
        ge=0,
        description="Number of the current gang: gangs started before it (restarts and resizes); "
        "workers see it as AMPACITY_ATTEMPT.",
    )
    restart_not_before: datetime | None = Field(
        default=None, description="The next gang is not started before this time (restart backoff)."
    )
    last_report_time: datetime | None = Field(
        default=None, description="When the trainer last reported progress."
    )
    step_seconds: float | None = Field(
        default=None, ge=0, description="Recent mean time per training step, as the trainer reported it."
    )
    checkpoint_cost: CheckpointCost | None = Field(
        default=None, description="Measured save stall and persist time the auto interval is derived from."
    )
    queue_position: int | None = Field(
        default=None,
        ge=1,
        description="While the gang waits for GPUs: its place among the waiting gangs (1 = next).",
    )
    nodes: int = Field(default=0, ge=0, description="Nodes the running gang spans.")
    gang_start_time: datetime | None = Field(
        default=None, description="When every worker of the current gang was first seen running."
    )
    report_token_hash: str = Field(
        default="",
        description="SHA-256 (hex) of the token in the <name>-report-token Secret that workers present "
        "to the report endpoint; the operator writes that Secret but never reads it back.",
    )
    exposure_node_hours: float = Field(
        default=0,
        ge=0,
        description="Node-hours earlier gangs ran, the failure-rate exposure besides the current gang's.",
    )
    cluster_failures: int = Field(
        default=0,
        ge=0,
        description="Gang failures the operator has seen on the cluster's other TrainingJobs; with "
        "clusterExposureNodeHours it updates the failure-rate prior of the auto interval.",
    )
    cluster_exposure_node_hours: float = Field(
        default=0,
        ge=0,
        description="Node-hours the cluster's other TrainingJobs have run, as the operator has seen them.",
    )


TRAINING_JOB = Resource(
    kind="TrainingJob",
    plural="trainingjobs",
    scope="Namespaced",
    spec=TrainingJobSpec,
    status=TrainingJobStatus,
    short_names=("tj",),
    name_limit=NameLimit(
        max_length=63 - len(f"-worker-{MAX_WORKERS - 1}"),
        because="worker pods are named <name>-worker-<rank> (rank up to 99999), and a pod's hostname "
        "holds at most 63 characters",
    ),
    description="Gang-scheduled distributed training with checkpoint orchestration.",
    printer_columns=(
        {"name": "Workers", "type": "integer", "jsonPath": ".status.replicas", "description": "World size."},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
        {"name": "Step", "type": "integer", "jsonPath": ".status.currentStep", "description": "Latest step."},
        {
            "name": "Checkpoint",
            "type": "integer",
            "jsonPath": ".status.latestCheckpoint.step",
            "description": "Step of the latest complete checkpoint.",
        },
        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "description": "Restarts."},
        {
            "name": "Queue",
            "type": "integer",
            "jsonPath": ".status.queuePosition",
            "description": "Place among the gangs waiting for GPUs.",
        },
        ready_column(),
        reason_column(),
        age_column(),
    ),
    scale={
        "specReplicasPath": ".spec.workers.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    },
)
