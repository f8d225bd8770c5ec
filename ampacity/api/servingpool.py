"""ServingPool: an LLM served with prefill/decode disaggregation under TTFT/TPOT SLOs."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import Field, model_validator

from ampacity.api.meta import ApiModel, Duration, Status, cel
from ampacity.api.resource import Resource, age_column, ready_column, reason_column


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
        description="Where the weights live (s3://, gs://, hf://, pvc://NAME/PATH); passed to the engine.",
    )
    architecture: ModelArchitecture | None = Field(
        default=None,
        description="The model's architecture, as in its config.json (`ampacity serving model-info` "
        "prints it); overrides the built-in entry of the same name.",
    )


class Engine(ApiModel):
    """The serving engine container: users bring the image, the operator sets roles and resources."""

    image: str = Field(min_length=1, description="Container image of the engine, e.g. vllm/vllm-openai:v0.9.")
    args: list[str] = Field(
        default_factory=list, description="Extra arguments appended to the engine command."
    )
    port: int = Field(default=8000, ge=1, le=65535, description="Port the engine serves HTTP on.")


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

    metrics_url: str = Field(
        min_length=1,
        description="Prometheus text endpoint with the pool's vLLM metrics (vllm:request_success_total, "
        "vllm:prompt_tokens_total, vllm:time_to_first_token_seconds, ...), e.g. the router's /metrics.",
    )
    cooldown: Duration = Field(
        default=300.0, description="How long demand must stay low before a phase shrinks, e.g. 5m."
    )
    scale_to_zero_after: Duration | None = Field(
        default=None,
        description="Stop every engine after this long without a request (needs minGpus 0); the next "
        "request brings the pool back. Unset: never scale to zero.",
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

    validations = (
        cel("self.minGpus <= self.maxGpus", "minGpus must not exceed maxGpus", ".minGpus"),
        cel(
            "has(self.workload.promptTokens) == has(self.workload.outputTokens)",
            "workload.promptTokens and workload.outputTokens go together",
            ".workload",
        ),
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
            "name": "Latency-Model",
            "type": "string",
            "jsonPath": ".status.plan.latencyModelSource",
            "description": "Calibrated, Extrapolated, Fitted or None (fallback plan).",
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
