"""A ServingPool spec to a plan: models by architecture, GPUs by product, the user's traffic and
latency profile, the fallback, and the preview `ampacity plan -f` prints."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from ampacity.api.gpu_products import gpu_product
from ampacity.api.servingpool import ModelArchitecture, ServingPlan, ServingPoolSpec, ServingPoolStatus
from ampacity.cli import main
from ampacity.data import trace_path
from ampacity.serving import planner, pool_plan
from ampacity.serving.cli import preview
from ampacity.serving.hardware import gpu, model, model_from_config
from ampacity.serving.latency import LatencyModel
from ampacity.serving.profile_fit import parse_vllm_bench

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
LLAMA31_8B = {
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
}
QWEN3_32B = {
    "num_hidden_layers": 64,
    "hidden_size": 5120,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 25600,
    "vocab_size": 151936,
}
MIXTRAL = {
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 32000,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}


def spec(**changes: Any) -> ServingPoolSpec:
    raw = yaml.safe_load((EXAMPLES / "servingpool.yaml").read_text())["spec"]
    for path, value in changes.items():
        node = raw
        *parents, leaf = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return ServingPoolSpec.model_validate(raw)


def test_gpu_type_takes_the_gfd_product_label_or_the_short_name() -> None:
    assert gpu_product("NVIDIA-H100-80GB-HBM3") is gpu_product("h100") is gpu_product("H100")
    assert gpu("NVIDIA-H200").memory_bytes > gpu("h100").memory_bytes
    assert gpu("NVIDIA-B200").peak_flops > gpu("h200").peak_flops
    with pytest.raises(KeyError, match="NVIDIA-L40S"):
        gpu_product("tpu-v5")


@pytest.mark.parametrize(
    ("config", "total", "active"),
    [(LLAMA31_8B, 8.03e9, 8.03e9), (QWEN3_32B, 32.8e9, 32.8e9), (MIXTRAL, 46.7e9, 12.9e9)],
)
def test_parameters_counted_from_the_architecture_match_the_published_sizes(
    config: dict[str, int], total: float, active: float
) -> None:
    spec_ = model_from_config("m", config)
    assert spec_.params == pytest.approx(total, rel=0.01)
    assert spec_.compute_params == pytest.approx(active, rel=0.01)


def test_a_mixture_of_experts_holds_all_experts_and_computes_with_the_active_ones() -> None:
    moe = model_from_config("mixtral", MIXTRAL)
    dense = model_from_config("dense", {**MIXTRAL, "num_local_experts": None, "num_experts_per_tok": None})
    dense_as_big = model_from_config("dense-47b", {**MIXTRAL, "num_parameters": int(moe.params)})
    dense_as_big = type(dense_as_big)(**{**dense_as_big.__dict__, "active_params": None})
    h100 = gpu("h100")
    # Memory: every expert's weights; the KV cache left is that of a 47B model.
    assert moe.weight_bytes == pytest.approx(2 * moe.params)
    assert (
        LatencyModel(moe, h100, 2).kv_capacity_tokens()
        == LatencyModel(dense_as_big, h100, 2).kv_capacity_tokens()
    )
    # Compute and bytes read: those of the 12.9B active parameters, below a dense 47B model's.
    for tp in (2, 4):
        sparse, big = LatencyModel(moe, h100, tp), LatencyModel(dense_as_big, h100, tp)
        assert sparse.decode_time(16, 16 * 1000) < big.decode_time(16, 16 * 1000)
        assert sparse.prefill_time(4096, 4096**2) < big.prefill_time(4096, 4096**2)
    assert dense.params < moe.params


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_attention_heads": 30}, "must divide hidden_size"),
        ({"num_key_value_heads": 5}, "must divide num_attention_heads"),
        ({"num_experts_per_tok": 9}, "must not exceed the number of experts"),
    ],
)
def test_contradicting_architectures_are_rejected_with_a_message(
    change: dict[str, int], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelArchitecture.model_validate({**MIXTRAL, **change})


def test_every_plan_says_where_its_latency_model_comes_from() -> None:
    calibrated = pool_plan.plan_pool(spec()).plan
    extrapolated = pool_plan.plan_pool(spec(gpuType="NVIDIA-H200")).plan
    assert calibrated.latency_model_source == "Calibrated" and "h100" in calibrated.latency_model
    assert extrapolated.latency_model_source == "Extrapolated"
    assert "extrapolated from h100" in extrapolated.latency_model
    unprofiled = pool_plan.plan_pool(spec(model__name="Qwen/Qwen3-32B", model__architecture=QWEN3_32B)).plan
    assert "never profiled" in unprofiled.latency_model


def test_an_unknown_model_runs_on_the_fallback_and_says_which_field_to_add() -> None:
    sized = pool_plan.plan_pool(spec(model__name="meta-llama/Llama-3.1-8B-Instruct", minGpus=4))
    assert sized.reason == pool_plan.NO_LATENCY_MODEL and not sized.planned
    assert "spec.model.architecture" in sized.message and "model-info" in sized.message
    assert sized.plan.mode == "colocated" and sized.plan.prefill_tensor_parallel == 1
    assert sized.plan.prefill_replicas == 4 and sized.plan.latency_model_source == "None"
    # TP from memory against the weights the name gives: 70B in 16 bit needs more than 2 H100s.
    big = pool_plan.plan_pool(spec(model__name="acme/Chat-70B", minGpus=8)).plan
    assert big.prefill_tensor_parallel == 4 and big.prefill_replicas == 2


def test_an_unknown_gpu_runs_on_the_fallback_and_names_the_catalogue() -> None:
    sized = pool_plan.plan_pool(spec(gpuType="NVIDIA-GH300"))
    assert sized.reason == pool_plan.NO_LATENCY_MODEL
    assert "'NVIDIA-GH300' is not in the GPU catalogue" in sized.message and "NVIDIA-H200" in sized.message


def test_unplannable_only_when_the_weights_exceed_max_gpus_of_memory() -> None:
    with pytest.raises(pool_plan.PlanningError, match="do not fit in maxGpus 4") as caught:
        pool_plan.plan_pool(spec(model__name="acme/Giant-405B", minGpus=0, maxGpus=4))
    assert caught.value.reason == pool_plan.UNPLANNABLE


def test_plans_hold_the_longest_request_the_workload_admits() -> None:
    # Mooncake's longest request (191k tokens) does not fit a TP2 instance of llama2-70b.
    plan = pool_plan.plan_pool(
        spec(workload__profile="mooncake", workload__peakRate=1.0, slo__ttft="10s")
    ).plan
    assert plan.longest_request_tokens == 191386
    for tp in (plan.prefill_tensor_parallel, plan.decode_tensor_parallel or plan.prefill_tensor_parallel):
        assert LatencyModel(model("llama2-70b"), gpu("h100"), tp).kv_capacity_tokens() >= 191386


def test_the_users_length_distribution_and_burstiness_drive_the_plan() -> None:
    short = {"percentiles": [{"percentile": 50, "tokens": 200}, {"percentile": 100, "tokens": 1000}]}
    long = {"percentiles": [{"percentile": 50, "tokens": 4000}, {"percentile": 100, "tokens": 16000}]}
    outputs = {
        "histogram": [{"upTo": 64, "count": 10}, {"upTo": 256, "count": 30}, {"upTo": 512, "count": 5}]
    }
    light = pool_plan.plan_pool(spec(workload__promptTokens=short, workload__outputTokens=outputs)).plan
    heavy = pool_plan.plan_pool(spec(workload__promptTokens=long, workload__outputTokens=outputs)).plan
    assert light.longest_request_tokens == 1000 + 512 and heavy.longest_request_tokens == 16000 + 512
    assert light.predicted_goodput > heavy.predicted_goodput
    bursty = pool_plan.plan_pool(
        spec(workload__promptTokens=short, workload__outputTokens=outputs, workload__burstiness=4.0)
    ).plan
    assert bursty.predicted_goodput < light.predicted_goodput
    with pytest.raises(ValidationError, match="must include the 100th"):
        spec(
            workload__promptTokens={"percentiles": [{"percentile": 50, "tokens": 200}]},
            workload__outputTokens=outputs,
        )


def _splitwise_csv(model_name: str, hardware: str) -> str:
    with trace_path("splitwise", "perf_model.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == model_name and r["hardware"] == hardware]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


@pytest.mark.usefixtures("traces_present")
def test_a_latency_profile_is_fitted_and_its_held_out_error_reported() -> None:
    profiled = spec(latencyProfile={"configMap": "llama-h100"})
    plan = pool_plan.plan_pool(profiled, _splitwise_csv("llama2-70b", "h100-80gb")).plan
    assert plan.latency_model_source == "Fitted" and "fitted" in plan.latency_model
    assert plan.profile_fit_error is not None and plan.profile_fit_error <= 0.05


def test_a_missing_or_unreadable_profile_names_the_configmap_and_the_row() -> None:
    profiled = spec(latencyProfile={"configMap": "llama-h100"})
    with pytest.raises(pool_plan.LatencyProfileError, match="'llama-h100' was not found"):
        pool_plan.plan_pool(profiled, None)
    header = "tensor_parallel,prompt_size,batch_size,token_size,prompt_time,token_time\n"
    rows = "".join(f"2,{128 * (i + 1)},1,256,{50 + i},20\n" for i in range(12))
    bad = header + "2,512,1,256,fast,20\n" + rows
    with pytest.raises(pool_plan.LatencyProfileError, match="'llama-h100': row 2: column 'prompt_time'"):
        pool_plan.plan_pool(profiled, bad)


def test_a_bad_profile_keeps_the_last_good_plan() -> None:
    status = ServingPoolStatus(
        plan=ServingPlan(mode="colocated", prefill_tensor_parallel=4, prefill_replicas=2, gpus=8)
    )
    kept = pool_plan.record_planning_error(status, pool_plan.LatencyProfileError("ConfigMap 'x' row 3"), 2)
    assert kept and status.plan is not None
    planned = status.condition(pool_plan.PLANNED_CONDITION)
    assert (
        planned is not None
        and planned.reason == pool_plan.LATENCY_PROFILE_INVALID
        and "row 3" in planned.message
    )
    assert not pool_plan.record_planning_error(status, pool_plan.PlanningError("too big"), 3)
    assert status.plan is None


def test_vllm_bench_serve_results_are_read_per_request() -> None:
    result = {
        "max_concurrency": 4,
        "tensor_parallel_size": 2,
        "input_lens": [512, 1024, 0],
        "output_lens": [128, 64, 0],
        "ttfts": [0.05, 0.09, 0.0],
        "itls": [[0.02, 0.021], [0.022], []],
    }
    rows = parse_vllm_bench(json.dumps(result), "m", "h100")
    assert [(r.tp, r.batch, r.prompt, r.output) for r in rows] == [(2, 4, 512, 128), (2, 4, 1024, 64)]
    assert rows[0].decode_step_s == pytest.approx(0.0205)


def test_identical_inputs_are_planned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = planner.plan

    def counting(*args: Any, **kwargs: Any) -> planner.Plan:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(planner, "plan", counting)
    first = pool_plan.plan_pool(spec(slo__tpot="90ms"))
    second = pool_plan.plan_pool(spec(slo__tpot="90ms", minGpus=16, maxGpus=32))
    assert len(calls) == 1  # the second pool differs in sizing only: the same unit search
    assert second.plan.gpus >= 16 and first.plan.predicted_goodput == second.plan.predicted_goodput


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("servingpool*.yaml")), ids=lambda p: p.name)
def test_the_preview_is_what_plan_pool_gives(path: Path) -> None:
    manifest = yaml.safe_load(path.read_text())
    shown = preview(manifest, {})
    sized = pool_plan.plan_pool(ServingPoolSpec.model_validate(manifest["spec"]))
    assert shown["status"]["plan"] == sized.plan.to_api()
    planned = next(c for c in shown["status"]["conditions"] if c["type"] == "Planned")
    assert planned["reason"] == sized.reason


def test_model_info_prints_a_block_the_spec_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**MIXTRAL, "architectures": ["MixtralForCausalLM"], "rope_theta": 1e6}))
    assert main(["serving", "model-info", str(config)]) == 0
    block = yaml.safe_load(capsys.readouterr().out)["architecture"]
    assert "rope_theta" not in block and block["num_local_experts"] == 8
    architecture = ModelArchitecture.model_validate(block)
    assert model_from_config("x", architecture.config()).params == pytest.approx(46.7e9, rel=0.01)


def test_workload_info_summarises_a_request_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "requests.csv"
    lines = ["timestamp,prompt_tokens,output_tokens"] + [
        f"{i * 0.5},{100 + i},{10 + i % 7}" for i in range(200)
    ]
    log.write_text("\n".join(lines) + "\n")
    assert main(["serving", "workload-info", str(log)]) == 0
    block = yaml.safe_load(capsys.readouterr().out)["workload"]
    assert block["promptTokens"]["percentiles"][-1] == {"percentile": 100.0, "tokens": 299}
    assert block["burstiness"] == pytest.approx(0.0, abs=1e-6)  # evenly spaced arrivals
    assert block["peakRate"] == pytest.approx(2.0)
    assert spec(workload__promptTokens=block["promptTokens"], workload__outputTokens=block["outputTokens"])
