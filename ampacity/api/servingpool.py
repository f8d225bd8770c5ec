"""ServingPool: an LLM served with prefill/decode disaggregation under TTFT/TPOT SLOs."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, JsonValue, StringConstraints

from ampacity.api.meta import ApiModel, Duration, Status, cel
from ampacity.api.resource import Resource, age_column, ready_column, reason_column


class ServingMode(StrEnum):
    COLOCATED = "colocated"
    DISAGGREGATED = "disaggregated"
    AUTO = "auto"


class ModelSource(ApiModel):
    """The model to serve and where its weights live."""

    name: str = Field(
        min_length=1,
        max_length=253,
        description="Model name known to the planner's latency model, e.g. llama2-70b.",
    )
    uri: str = Field(
        min_length=1,
        max_length=2048,
        description="Where the weights live: hf://ORG/NAME (a Hugging Face repo id), pvc://CLAIM/PATH (a "
        "PersistentVolumeClaim in the pool's namespace, mounted read-only), s3://BUCKET/PATH or "
        "gs://BUCKET/PATH (streamed with vLLM's runai_streamer loader).",
    )

    validations = (
        cel(
            "self.uri.matches('^(hf://[^/]+/.+|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|s3://.+|gs://.+)$')",
            "model.uri must be hf://ORG/NAME, pvc://CLAIM/PATH, s3://BUCKET/PATH or gs://BUCKET/PATH",
            ".uri",
        ),
    )


#: `vllm serve` flags the operator sets from the plan and the spec; `engine.args` may not set them.
PLANNED_ENGINE_FLAGS = (
    "--tensor-parallel-size",
    "-tp",
    "--port",
    "--host",
    "--kv-transfer-config",
    "--served-model-name",
    "--load-format",
    "--model",
)
_OPEN_OBJECT: dict[str, JsonValue] = {"x-kubernetes-preserve-unknown-fields": True}


def _open_list(description: str) -> Any:
    return Field(
        default_factory=list,
        description=description,
        json_schema_extra={"items": {"type": "object", **_OPEN_OBJECT}},
    )


class Engine(ApiModel):
    """The serving engine container: users bring the image, the operator sets roles and resources.

    The operator runs `vllm serve MODEL --port PORT --tensor-parallel-size TP --served-model-name NAME`
    (plus the KV connector in disaggregated mode and the loader for s3:// and gs://); `args` follow.
    The pod-level fields below are merged under the operator's own (GPU requests, probes, the model
    volume, /dev/shm), which always win.
    """

    image: str = Field(
        min_length=1, description="Container image of the engine, e.g. vllm/vllm-openai:v0.11.0."
    )
    args: list[Annotated[str, StringConstraints(max_length=4096)]] = Field(
        default_factory=list,
        max_length=128,
        description="Extra `vllm serve` arguments, appended after the operator's. Flags the plan sets "
        "(--tensor-parallel-size, --port, --kv-transfer-config, ...) are rejected.",
    )
    port: int = Field(default=8000, ge=1, le=65535, description="Port the engine serves HTTP on.")
    model_credentials_secret: str | None = Field(
        default=None,
        description="Secret (same namespace) whose keys become the engine's environment: HF_TOKEN for "
        "hf:// models, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL) for s3://, "
        "GOOGLE_APPLICATION_CREDENTIALS-style keys for gs://. The operator never reads it.",
    )
    env: list[dict[str, Any]] = _open_list(
        "Extra environment variables of the engine container (core/v1 EnvVar)."
    )
    env_from: list[dict[str, Any]] = _open_list(
        "Extra envFrom sources of the engine container (core/v1 EnvFromSource)."
    )
    volumes: list[dict[str, Any]] = _open_list("Extra volumes of the engine pod (core/v1 Volume).")
    volume_mounts: list[dict[str, Any]] = _open_list(
        "Extra volume mounts of the engine container (core/v1 VolumeMount)."
    )
    resources: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra requests and limits of the engine container (core/v1 ResourceRequirements), e.g. "
        "cpu and memory; the GPU count comes from the plan.",
        json_schema_extra=_OPEN_OBJECT,
    )
    tolerations: list[dict[str, Any]] = _open_list("Tolerations of the engine pods (core/v1 Toleration).")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the engine pods need, on top of the GPU affinity."
    )
    service_account_name: str | None = Field(
        default=None, description="ServiceAccount of the engine pods (default: the namespace's default)."
    )
    image_pull_secrets: list[dict[str, Any]] = _open_list(
        "Secrets for pulling the engine image (core/v1 LocalObjectReference: {name: ...})."
    )

    validations = (
        cel(
            "!self.args.exists(a, a.matches('^(" + "|".join(PLANNED_ENGINE_FLAGS) + ")(=.*)?$'))",
            "engine.args may not set " + ", ".join(PLANNED_ENGINE_FLAGS) + ": the operator sets them "
            "from the plan and the spec",
            ".args",
        ),
    )


class RouterPolicy(StrEnum):
    ROUND_ROBIN = "round_robin"
    POWER_OF_TWO = "power_of_two"
    CACHE_AWARE = "cache_aware"
    RANDOM = "random"
    CONSISTENT_HASH = "consistent_hash"


class Router(ApiModel):
    """The pool's front door: vllm-router, one Service named after the pool."""

    image: str | None = Field(
        default=None,
        description="Image with the vllm-router binary (PyPI vllm-router); default: the operator's "
        "configured router image.",
    )
    policy: RouterPolicy = Field(
        default=RouterPolicy.ROUND_ROBIN,
        description="Load-balancing policy over the engines (in disaggregated mode, for both phases).",
    )
    replicas: int = Field(default=1, ge=1, le=16, description="Router instances behind the pool's Service.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the pool's Service and router.")


class ServingSLO(ApiModel):
    """Latency objectives a request must meet to count towards goodput."""

    ttft: Duration = Field(description="Time-to-first-token objective, e.g. 1s.")
    tpot: Duration = Field(description="Time-per-output-token objective, e.g. 100ms.")
    attainment: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Fraction of requests that must meet both objectives (DistServe uses 0.9).",
    )

    validations = (
        cel("duration(self.ttft) > duration('0s')", "slo.ttft must be greater than zero", ".ttft"),
        cel("duration(self.tpot) > duration('0s')", "slo.tpot must be greater than zero", ".tpot"),
    )


class WorkloadProfile(StrEnum):
    AZURE_CONV = "azure-conv"
    MOONCAKE = "mooncake"


class ServingWorkload(ApiModel):
    """The traffic the pool is planned for."""

    profile: WorkloadProfile = Field(
        default=WorkloadProfile.AZURE_CONV,
        description="Request-length mix to plan with: azure-conv (chat, ~1k-token prompts) or mooncake "
        "(long-context, ~15k-token prompts).",
    )
    peak_rate: float | None = Field(
        default=None,
        gt=0,
        description="Requests per second the pool must sustain within the SLOs; unset plans one "
        "prefill/decode unit (or minGpus).",
    )


class Autoscaling(ApiModel):
    """Resizing each phase from the engines' live metrics between plans."""

    metrics_url: str | None = Field(
        default=None,
        min_length=1,
        description="One Prometheus text endpoint with the whole pool's vLLM metrics "
        "(vllm:request_success_total, vllm:prompt_tokens_total, vllm:time_to_first_token_seconds, ...) "
        "to read instead of the engines. Unset: the operator scrapes every Ready engine pod's /metrics "
        "and differences each engine's counters on their own.",
    )
    cooldown: Duration = Field(
        default=300.0, description="How long demand must stay low before a phase shrinks, e.g. 5m."
    )
    scale_to_zero_after: Duration | None = Field(
        default=None,
        description="Stop every engine after this long without a request (needs minGpus 0); the next "
        "request brings the pool back. Unset: never scale to zero.",
    )


class ServingPoolSpec(ApiModel):
    """Desired state of a ServingPool."""

    model: ModelSource = Field(description="The model to serve.")
    engine: Engine = Field(description="The serving engine container.")
    gpu_type: str = Field(
        min_length=1,
        description="GPU model to run on, matched against the node label nvidia.com/gpu.product "
        "(e.g. NVIDIA-H100-80GB-HBM3) or the short form ampacity.dev/gpu-type (h100, a100).",
    )
    slo: ServingSLO = Field(description="Latency objectives.")
    workload: ServingWorkload = Field(
        default_factory=lambda: ServingWorkload(), description="The traffic to plan for."
    )
    mode: ServingMode = Field(
        default=ServingMode.AUTO,
        description="colocated: prefill and decode share instances; disaggregated: separate "
        "prefill and decode instances; auto: whichever the planner predicts has more goodput per GPU.",
    )
    min_gpus: int = Field(
        default=0, ge=0, description="Fewest GPUs the pool may use (0 allows scale to zero)."
    )
    max_gpus: int = Field(ge=1, description="Most GPUs the pool may use.")
    autoscaling: Autoscaling | None = Field(
        default=None, description="Re-plan from live metrics; unset keeps the planned size."
    )
    router: Router = Field(
        default_factory=lambda: Router(), description="The router in front of the engines."
    )

    validations = (
        cel("self.minGpus <= self.maxGpus", "minGpus must not exceed maxGpus", ".minGpus"),
        cel(
            "!has(self.autoscaling) || !has(self.autoscaling.scaleToZeroAfter) || self.minGpus == 0",
            "autoscaling.scaleToZeroAfter needs minGpus 0",
            ".autoscaling",
        ),
    )


class ServingPlan(ApiModel):
    """The deployment the planner chose."""

    mode: ServingMode = Field(description="colocated or disaggregated.")
    prefill_tensor_parallel: int = Field(ge=1, description="Tensor-parallel degree of each prefill instance.")
    prefill_replicas: int = Field(ge=0, description="Number of prefill instances.")
    decode_tensor_parallel: int = Field(
        default=0, ge=0, description="Tensor-parallel degree of each decode instance (0 when colocated)."
    )
    decode_replicas: int = Field(
        default=0, ge=0, description="Number of decode instances (0 when colocated)."
    )
    gpus: int = Field(ge=0, description="GPUs the plan uses.")
    predicted_goodput: float = Field(
        default=0, ge=0, description="Predicted goodput in requests per second per GPU."
    )
    predicted_attainment: float = Field(
        default=0, ge=0, le=1, description="Predicted fraction of requests meeting both SLOs."
    )
    colocated_goodput: float = Field(
        default=0, ge=0, description="Predicted goodput per GPU of the best colocated pool, for comparison."
    )
    capacity: float = Field(default=0, ge=0, description="Requests per second the planned pool sustains.")


class AutoscalingStatus(ApiModel):
    """What the last look at the live metrics decided."""

    prefill_replicas: int = Field(
        default=0,
        ge=0,
        description="Prefill instances (colocated: engine instances) chosen from live metrics.",
    )
    decode_replicas: int = Field(default=0, ge=0, description="Decode instances chosen from live metrics.")
    observed_rate: float = Field(default=0, ge=0, description="Requests per second over the last interval.")
    reason: str = Field(default="", description="Why this size.")
    last_request_time: datetime | None = Field(default=None, description="When a request was last seen.")
    state: str = Field(default="", description="The re-planner's memory between intervals (JSON).")


class ServingPoolStatus(Status):
    """Observed state of a ServingPool."""

    plan: ServingPlan | None = Field(default=None, description="The plan in force.")
    autoscaling: AutoscalingStatus | None = Field(
        default=None, description="Sizing from live metrics, when spec.autoscaling is set."
    )
    replicas: int = Field(default=0, ge=0, description="Engine instances created (prefill plus decode).")
    ready_replicas: int = Field(default=0, ge=0, description="Engine instances that are ready.")
    endpoint: str = Field(
        default="",
        description="The pool's OpenAI-compatible base URL inside the cluster (the router's Service).",
    )


SERVING_POOL = Resource(
    kind="ServingPool",
    plural="servingpools",
    scope="Namespaced",
    spec=ServingPoolSpec,
    status=ServingPoolStatus,
    short_names=("sp",),
    description="An LLM served under TTFT/TPOT objectives, with prefill and decode disaggregated "
    "when that yields more goodput per GPU.",
    printer_columns=(
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name", "description": "Served model."},
        {"name": "Mode", "type": "string", "jsonPath": ".status.plan.mode", "description": "Planned mode."},
        {"name": "GPUs", "type": "integer", "jsonPath": ".status.plan.gpus", "description": "GPUs planned."},
        {
            "name": "Endpoint",
            "type": "string",
            "jsonPath": ".status.endpoint",
            "description": "OpenAI base URL of the pool.",
        },
        {
            "name": "Ready-Replicas",
            "type": "integer",
            "jsonPath": ".status.readyReplicas",
            "description": "Engine instances ready.",
        },
        ready_column(),
        reason_column(),
        age_column(),
    ),
)
