"""ServingPool: an LLM served with prefill/decode disaggregation under TTFT/TPOT SLOs."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, JsonValue, StringConstraints, model_validator

from ampacity.api.meta import DNS_LABEL, ApiModel, Duration, NameLimit, PositiveDuration, Status, cel
from ampacity.api.podtemplate import Quantity
from ampacity.api.resource import Resource, age_column, ready_column, reason_column

#: The model sources vLLM can load (see controllers/servingpool/children.py for how each is wired).
MODEL_URI_PATTERN = "^(hf://[^/]+/.+|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|s3://.+|gs://.+)$"


class ServingMode(StrEnum):
    COLOCATED = "colocated"
    DISAGGREGATED = "disaggregated"
    AUTO = "auto"


def _positive(description: str) -> Any:
    return Field(default=None, ge=1, description=description)


class ModelArchitecture(ApiModel):
    """The architecture the latency model needs, named as in the model's Hugging Face config.json.

    `ampacity serving model-info config.json` prints this block from a downloaded config. Weight
    memory comes from all parameters, FLOPs and bytes read per token from the active ones (for a
    mixture of experts: the experts a token is routed to, plus shared experts).
    """

    num_hidden_layers: int = Field(ge=1, alias="num_hidden_layers", description="Transformer layers.")
    hidden_size: int = Field(ge=1, alias="hidden_size", description="Model width.")
    num_attention_heads: int = Field(ge=1, alias="num_attention_heads", description="Query heads.")
    num_key_value_heads: int | None = Field(
        default=None,
        ge=1,
        alias="num_key_value_heads",
        description="KV heads (GQA); unset: one per query head.",
    )
    head_dim: int | None = Field(
        default=None, ge=1, alias="head_dim", description="Width of one head; unset: hidden_size / heads."
    )
    intermediate_size: int | None = Field(
        default=None, ge=1, alias="intermediate_size", description="MLP width (per expert for Mixtral)."
    )
    vocab_size: int | None = Field(default=None, ge=1, alias="vocab_size", description="Vocabulary size.")
    tie_word_embeddings: bool | None = Field(
        default=None, alias="tie_word_embeddings", description="The LM head shares the input embeddings."
    )
    num_local_experts: int | None = Field(
        default=None, ge=1, alias="num_local_experts", description="Routed experts (Mixtral's name)."
    )
    n_routed_experts: int | None = Field(
        default=None, ge=1, alias="n_routed_experts", description="Routed experts (DeepSeek's name)."
    )
    num_experts: int | None = Field(
        default=None, ge=1, alias="num_experts", description="Routed experts (Qwen MoE's name)."
    )
    num_experts_per_tok: int | None = Field(
        default=None, ge=1, alias="num_experts_per_tok", description="Experts each token is routed to."
    )
    n_shared_experts: int | None = Field(
        default=None, ge=0, alias="n_shared_experts", description="Experts every token uses (DeepSeek)."
    )
    moe_intermediate_size: int | None = Field(
        default=None, ge=1, alias="moe_intermediate_size", description="MLP width of one routed expert."
    )
    shared_expert_intermediate_size: int | None = Field(
        default=None,
        ge=1,
        alias="shared_expert_intermediate_size",
        description="Shared expert MLP width (Qwen).",
    )
    first_k_dense_replace: int | None = Field(
        default=None, ge=0, alias="first_k_dense_replace", description="Leading dense layers (DeepSeek)."
    )
    kv_lora_rank: int | None = Field(
        default=None, ge=1, alias="kv_lora_rank", description="Latent KV width (multi-head latent attention)."
    )
    qk_rope_head_dim: int | None = Field(
        default=None, ge=0, alias="qk_rope_head_dim", description="Rotary key width cached beside the latent."
    )
    num_parameters: int | None = Field(
        default=None,
        ge=1,
        alias="num_parameters",
        description="Total parameters (from the checkpoint); unset: counted from the architecture.",
    )

    validations = (
        cel(
            "has(self.head_dim) || self.hidden_size % self.num_attention_heads == 0",
            "num_attention_heads must divide hidden_size (or set head_dim)",
            ".num_attention_heads",
        ),
        cel(
            "!has(self.num_key_value_heads) || self.num_attention_heads % self.num_key_value_heads == 0",
            "num_key_value_heads must divide num_attention_heads",
            ".num_key_value_heads",
        ),
        cel(
            "!has(self.num_experts_per_tok) || self.num_experts_per_tok <= "
            "(has(self.num_local_experts) ? self.num_local_experts : "
            "(has(self.n_routed_experts) ? self.n_routed_experts : "
            "(has(self.num_experts) ? self.num_experts : 1)))",
            "num_experts_per_tok must not exceed the number of experts",
            ".num_experts_per_tok",
        ),
        cel(
            "!has(self.first_k_dense_replace) || self.first_k_dense_replace < self.num_hidden_layers",
            "first_k_dense_replace must be smaller than num_hidden_layers",
            ".first_k_dense_replace",
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelArchitecture:
        # The same rules as the CEL above, for objects that never met an API server (`ampacity plan`).
        experts = self.num_local_experts or self.n_routed_experts or self.num_experts or 1
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("num_attention_heads must divide hidden_size (or set head_dim)")
        if self.num_key_value_heads and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_key_value_heads must divide num_attention_heads")
        if self.num_experts_per_tok and self.num_experts_per_tok > experts:
            raise ValueError("num_experts_per_tok must not exceed the number of experts")
        if self.first_k_dense_replace is not None and self.first_k_dense_replace >= self.num_hidden_layers:
            raise ValueError("first_k_dense_replace must be smaller than num_hidden_layers")
        return self

    def config(self) -> dict[str, Any]:
        """The fields as a config.json would hold them."""
        return self.model_dump(by_alias=True, exclude_none=True)


class ModelSource(ApiModel):
    """The model to serve and where its weights live."""

    name: str = Field(
        min_length=1,
        max_length=253,
        description="Model name, e.g. meta-llama/Llama-3.1-8B-Instruct. The planner knows llama2-70b, "
        "bloom-176b, llama3-8b and llama3-70b by name; any other model needs `architecture` (or a "
        "`latencyProfile`) to be planned, and runs on the fallback plan otherwise.",
    )
    uri: str = Field(
        min_length=1,
        max_length=2048,
        description="Where the weights live: hf://ORG/NAME (a Hugging Face repo id), pvc://CLAIM/PATH (a "
        "PersistentVolumeClaim in the pool's namespace, mounted read-only), s3://BUCKET/PATH or "
        "gs://BUCKET/PATH (streamed with vLLM's runai_streamer loader).",
    )
    architecture: ModelArchitecture | None = Field(
        default=None,
        description="The model's architecture, as in its config.json (`ampacity serving model-info` "
        "prints it); overrides the built-in entry of the same name.",
    )

    validations = (
        cel(
            f"self.uri.matches('{MODEL_URI_PATTERN}')",
            "model.uri must be hf://ORG/NAME, pvc://CLAIM/PATH, s3://BUCKET/PATH or gs://BUCKET/PATH",
            ".uri",
            check=lambda s: re.match(MODEL_URI_PATTERN, s.uri) is not None,
        ),
    )


#: `vllm serve` flags the operator sets from the plan and the spec; `engine.args` may not set them.
PLANNED_ENGINE_FLAGS = (
    "--tensor-parallel-size",
    "--enable-chunked-prefill",
    "--max-num-batched-tokens",
    "-tp",
    "--port",
    "--host",
    "--kv-transfer-config",
    "--served-model-name",
    "--load-format",
    "--model",
)
_PLANNED_FLAG_PATTERN = "^(" + "|".join(PLANNED_ENGINE_FLAGS) + ")(=.*)?$"
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
            f"!self.args.exists(a, a.matches('{_PLANNED_FLAG_PATTERN}'))",
            "engine.args may not set " + ", ".join(PLANNED_ENGINE_FLAGS) + ": the operator sets them "
            "from the plan and the spec",
            ".args",
            check=lambda s: not any(re.match(_PLANNED_FLAG_PATTERN, a) for a in s.args),
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

    ttft: PositiveDuration = Field(description="Time-to-first-token objective, e.g. 1s.")
    tpot: PositiveDuration = Field(description="Time-per-output-token objective, e.g. 100ms.")
    attainment: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Fraction of requests that must meet both objectives (DistServe uses 0.9).",
    )


class WorkloadProfile(StrEnum):
    AZURE_CONV = "azure-conv"
    MOONCAKE = "mooncake"


class LengthPercentile(ApiModel):
    percentile: float = Field(gt=0, le=100, description="Percent of requests at or below `tokens`.")
    tokens: int = Field(ge=1, description="Length in tokens.")


class LengthBucket(ApiModel):
    up_to: int = Field(ge=1, description="Upper bound of the bucket in tokens (inclusive).")
    count: int = Field(ge=0, description="Requests in the bucket.")


class LengthDistribution(ApiModel):
    """A request-length distribution: percentiles or a histogram (`ampacity serving workload-info`
    prints one from a request log). Its largest value is the longest request the pool admits."""

    percentiles: list[LengthPercentile] | None = Field(
        default=None, max_length=64, description="Percentile points; must include the 100th (the longest)."
    )
    histogram: list[LengthBucket] | None = Field(
        default=None, max_length=256, description="Buckets by upper bound, in increasing order."
    )

    validations = (
        cel("has(self.percentiles) != has(self.histogram)", "give either percentiles or a histogram"),
        cel(
            "!has(self.percentiles) || self.percentiles.exists(p, p.percentile == 100.0)",
            "percentiles must include the 100th: the longest request the pool must admit",
            ".percentiles",
        ),
        cel(
            "!has(self.histogram) || self.histogram.exists(b, b.count > 0)",
            "the histogram needs at least one request",
            ".histogram",
        ),
    )

    @model_validator(mode="after")
    def _one_form(self) -> LengthDistribution:
        if (self.percentiles is None) == (self.histogram is None):
            raise ValueError("give either percentiles or a histogram")
        if self.percentiles is not None and not any(p.percentile == 100 for p in self.percentiles):
            raise ValueError("percentiles must include the 100th: the longest request the pool must admit")
        if self.histogram is not None and not any(b.count for b in self.histogram):
            raise ValueError("the histogram needs at least one request")
        return self


class ServingWorkload(ApiModel):
    """The traffic the pool is planned for."""

    profile: WorkloadProfile = Field(
        default=WorkloadProfile.AZURE_CONV,
        description="Request-length mix to plan with: azure-conv (chat, ~1k-token prompts) or mooncake "
        "(long-context, ~15k-token prompts). promptTokens/outputTokens replace it.",
    )
    prompt_tokens: LengthDistribution | None = Field(
        default=None, description="The pool's own prompt-length distribution (with outputTokens)."
    )
    output_tokens: LengthDistribution | None = Field(
        default=None, description="The pool's own output-length distribution (with promptTokens)."
    )
    burstiness: float | None = Field(
        default=None,
        gt=0,
        le=20,
        description="Coefficient of variation of the gaps between arrivals (1: Poisson, above 1 burstier); "
        "unset: the profile's trace's own (azure-conv, mooncake) or 1.",
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
    scale_to_zero_after: PositiveDuration | None = Field(
        default=None,
        description="Stop every engine after this long without a request (needs minGpus 0); the next "
        "request brings the pool back. Unset: never scale to zero.",
    )


class Activator(ApiModel):
    """The activator: the pool's front door while it can be at zero or asleep.

    It holds a request that finds no engine ready (stopped or asleep) instead of refusing it, asks
    the operator to wake the pool at once (it writes status.activation, the only field it may
    write), and sends the request on through the router once every phase serves. Past either limit
    it answers 503 with Retry-After and the reason. Deployed with the pool whenever
    autoscaling.scaleToZeroAfter or sleep is set; the defaults apply when this is unset.
    """

    max_queue: int = Field(
        default=100, ge=1, le=10000, description="Requests held at most while the pool wakes; more get 503."
    )
    max_wait: PositiveDuration = Field(
        default=300.0,
        description="Longest a request is held, e.g. 5m (a cold start loads the weights: minutes); then 503.",
    )
    replicas: int = Field(default=1, ge=1, le=16, description="Activators behind the pool's Service.")
    image: str | None = Field(
        default=None, description="Image with the `ampacity` command; default: the operator's image."
    )


class SleepGroup(ApiModel):
    """Opt-in: the pool's engines sleep (vLLM sleep mode) instead of stopping when idle, sharing GPUs
    with the engines of the other pools of the same group, at most one awake per GPU.

    A sleeping engine frees its GPU memory but its pod keeps the GPU in Kubernetes' accounting, so
    sleeping saves GPU-time only when pools share GPUs (time-sliced GPUs advertised as several
    nvidia.com/gpu). The engines get `--enable-sleep-mode` and VLLM_SERVER_DEV_MODE=1; an engine
    whose sleep fails is stopped and started instead (condition SleepModeUnavailable).
    """

    group: str = Field(
        min_length=1,
        max_length=63,
        pattern=DNS_LABEL,
        description="Name of the group; pools in one namespace with the same name share GPUs.",
    )
    sleepers_per_gpu: int = Field(
        default=4, ge=1, le=16, description="How many sleeping models may share one GPU (with one awake)."
    )
    host_memory: Quantity | None = Field(
        default=None,
        description="Host memory each engine needs to keep its weights while asleep at level 1, e.g. "
        "160Gi (about the weights' size); requested by the engine pods so the scheduler counts it.",
    )
    level: int = Field(
        default=1,
        ge=1,
        le=2,
        description="vLLM sleep level: 1 offloads the weights to host memory (wakes in about a second), "
        "2 drops them (wakes by reloading them, seconds more; no host memory needed).",
    )
    sleep_after: PositiveDuration = Field(
        default=60.0, description="Idle time (nothing running or waiting) before an engine sleeps, e.g. 1m."
    )

    validations = (
        cel(
            "self.level == 2 || has(self.hostMemory)",
            "sleep level 1 keeps the weights in host memory: set hostMemory (or use level 2)",
            ".hostMemory",
            check=lambda s: s.level == 2 or s.host_memory is not None,
        ),
    )


class LatencyProfileRef(ApiModel):
    """A ConfigMap in the pool's namespace with measured latencies of the model on the GPU type."""

    config_map: str = Field(min_length=1, max_length=253, description="Name of the ConfigMap.")
    key: str | None = Field(
        default=None,
        min_length=1,
        description="Data key holding the profile; unset: the ConfigMap's only key. CSV rows like "
        "Splitwise's perf_model.csv (tensor_parallel, prompt_size, batch_size, token_size, prompt_time, "
        "token_time in ms), or the JSON `vllm bench serve --save-result` writes.",
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
    latency_profile: LatencyProfileRef | None = Field(
        default=None,
        description="Measured latencies of this model on this GPU: the planner fits its latency model to "
        "them (needed for exact plans on GPUs it has no calibration for).",
    )
    router: Router = Field(
        default_factory=lambda: Router(), description="The router in front of the engines."
    )
    activator: Activator | None = Field(
        default=None,
        description="Limits of the activator that holds requests while the pool wakes (needs "
        "autoscaling.scaleToZeroAfter or sleep); unset: its defaults.",
    )
    sleep: SleepGroup | None = Field(
        default=None, description="Sleep instead of stopping, sharing GPUs with the group's other pools."
    )

    validations = (
        cel(
            "self.minGpus <= self.maxGpus",
            "minGpus must not exceed maxGpus",
            ".minGpus",
            check=lambda s: s.min_gpus <= s.max_gpus,
        ),
        cel(
            "has(self.workload.promptTokens) == has(self.workload.outputTokens)",
            "workload.promptTokens and workload.outputTokens go together",
            ".workload",
            check=lambda s: (s.workload.prompt_tokens is None) == (s.workload.output_tokens is None),
        ),
        cel(
            "!has(self.autoscaling) || !has(self.autoscaling.scaleToZeroAfter) || self.minGpus == 0",
            "autoscaling.scaleToZeroAfter needs minGpus 0",
            ".autoscaling",
            check=lambda s: (
                s.autoscaling is None or s.autoscaling.scale_to_zero_after is None or s.min_gpus == 0
            ),
        ),
        cel(
            "!has(self.activator) || has(self.sleep) || "
            "(has(self.autoscaling) && has(self.autoscaling.scaleToZeroAfter))",
            "activator settings need a pool that can be at zero or asleep: set "
            "autoscaling.scaleToZeroAfter or sleep",
            ".activator",
            check=lambda s: s.activator is None or s.sleep is not None or s.scales_to_zero,
        ),
        cel(
            "!has(self.sleep) || has(self.autoscaling)",
            "sleep needs autoscaling: an engine's idle time is read from the live metrics it scrapes",
            ".sleep",
            check=lambda s: s.sleep is None or s.autoscaling is not None,
        ),
        cel(
            "!has(self.sleep) || !has(self.autoscaling) || !has(self.autoscaling.scaleToZeroAfter) || "
            "duration(self.sleep.sleepAfter) < duration(self.autoscaling.scaleToZeroAfter)",
            "sleep.sleepAfter must be shorter than autoscaling.scaleToZeroAfter: an engine sleeps before "
            "it is stopped",
            ".sleep",
            check=lambda s: (
                s.sleep is None
                or s.autoscaling is None
                or s.autoscaling.scale_to_zero_after is None
                or s.sleep.sleep_after < s.autoscaling.scale_to_zero_after
            ),
        ),
    )

    @property
    def scales_to_zero(self) -> bool:
        return self.autoscaling is not None and self.autoscaling.scale_to_zero_after is not None

    @property
    def activated(self) -> bool:
        """The pool can be at zero or asleep, so an activator stands in front of it."""
        return self.scales_to_zero or self.sleep is not None


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
    prefill_chunk_tokens: int = Field(
        default=0,
        ge=0,
        description="Colocated engines: chunked prefill with at most this many prompt tokens per pass "
        "(vLLM --enable-chunked-prefill --max-num-batched-tokens, given to the engine as "
        "AMPACITY_PREFILL_CHUNK); 0: whole prompts.",
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
    latency_model: str = Field(
        default="",
        description="Where the latency model behind the prediction comes from: calibrated on measured "
        "profiles of this GPU, extrapolated from another GPU's, fitted to the pool's latencyProfile, or "
        "none (fallback plan).",
    )
    latency_model_source: str = Field(default="", description="Calibrated, Extrapolated, Fitted or None.")
    profile_fit_error: float | None = Field(
        default=None, ge=0, description="Median relative error of the fitted latency model on held-out rows."
    )
    longest_request_tokens: int = Field(
        default=0, ge=0, description="Prompt plus output tokens of the longest request the plan admits."
    )
    latency_profile_digest: str = Field(
        default="",
        max_length=64,
        description="SHA-256 of the latencyProfile text the plan was fitted to (empty without one): an "
        "edited profile re-plans the pool.",
    )


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


class ActivationStatus(ApiModel):
    """What the activator reports: written by the activator only (never by the operator)."""

    wake_requested_at: datetime | None = Field(
        default=None,
        description="When the activator last asked for the pool to wake: it held a request and no "
        "engine served. The operator scales the pool up (or wakes its engines) at once.",
    )
    held_requests: int = Field(default=0, ge=0, description="Requests it held when it asked.")
    wakes: int = Field(default=0, ge=0, description="Wake-ups it has asked for since it started.")
    last_wait_seconds: float = Field(
        default=0, ge=0, description="Longest wait of a held request in the last wake-up, in seconds."
    )
    waited_seconds: float = Field(
        default=0, ge=0, description="Seconds requests have spent held, summed, since it started."
    )


class PoolTier(StrEnum):
    AWAKE = "awake"
    WAKING = "waking"
    ASLEEP = "asleep"
    STOPPED = "stopped"


class SleepStatus(ApiModel):
    """The pool's engines in the sleep group, as the operator last saw them."""

    awake: int = Field(default=0, ge=0, description="Engines awake.")
    asleep: int = Field(default=0, ge=0, description="Engines asleep (weights offloaded or dropped).")
    wakes: int = Field(default=0, ge=0, description="Wakes the operator issued (POST /wake_up).")
    sleeps: int = Field(default=0, ge=0, description="Sleeps the operator issued (POST /sleep).")
    blocked: str = Field(
        default="", description="Why a wake waits (another pool of the group is awake on its GPU)."
    )


class ServingPoolStatus(Status):
    """Observed state of a ServingPool."""

    tier: PoolTier | None = Field(
        default=None,
        description="awake (serving), waking, asleep (engines asleep, GPUs kept) or stopped (no engine).",
    )
    activation: ActivationStatus | None = Field(
        default=None, description="The activator's own report (wake requests, time requests waited)."
    )
    sleep: SleepStatus | None = Field(default=None, description="Sleep-group state, when spec.sleep is set.")

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
    name_limit=NameLimit(
        max_length=63,
        because="its endpoint is a Service named <name> (the router in front of its engines), and a "
        "Service name holds at most 63 characters",
    ),
    description="An LLM served under TTFT/TPOT objectives, with prefill and decode disaggregated "
    "when that yields more goodput per GPU.",
    printer_columns=(
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name", "description": "Served model."},
        {"name": "Mode", "type": "string", "jsonPath": ".status.plan.mode", "description": "Planned mode."},
        {"name": "GPUs", "type": "integer", "jsonPath": ".status.plan.gpus", "description": "GPUs planned."},
        {
            "name": "Latency-Model",
            "type": "string",
            "jsonPath": ".status.plan.latencyModelSource",
            "description": "Calibrated, Extrapolated, Fitted or None (fallback plan).",
        },
        {
            "name": "Endpoint",
            "type": "string",
            "jsonPath": ".status.endpoint",
            "description": "OpenAI base URL of the pool.",
        },
        {
            "name": "Tier",
            "type": "string",
            "jsonPath": ".status.tier",
            "description": "awake, waking, asleep or stopped.",
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
