"""A ServingPool's children without a cluster: engine commands, env, volumes and probes per model
source and mode, the router's arguments and RBAC, and args that contradict the plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from ampacity.api import SERVING_POOL
from ampacity.api.gpu import GPU_PRODUCT_LABEL, GPU_RESOURCE
from ampacity.api.servingpool import ServingPoolSpec
from controllers.reconciler import Context
from controllers.servingpool import children

REPO = Path(__file__).resolve().parents[3]


def context(**changes: Any) -> Context:
    manifest = yaml.safe_load((REPO / "examples" / "servingpool.yaml").read_text())
    manifest["metadata"] |= {"uid": "0000-1111", "generation": 3, "namespace": "team-a"}
    for key, value in changes.items():
        manifest["spec"][key] = value
    return Context(
        SERVING_POOL,
        kopf.Body(manifest),
        ServingPoolSpec.model_validate(manifest["spec"]),
        SERVING_POOL.status(),
        kube=None,  # type: ignore[arg-type]
        logger=None,
    )


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def engine(ctx: Context, role: str = "engine", tp: int = 4) -> dict[str, Any]:
    return children.engine_deployment(ctx, ctx.spec, role, 2, tp, [])


def test_colocated_engine_runs_vllm_serve_with_the_planned_parallelism() -> None:
    ctx = context()
    deployment = engine(ctx)
    c = container(deployment)
    assert c["command"] == ["vllm", "serve"]
    assert c["args"] == [
        "meta-llama/Llama-2-70b-chat-hf",
        "--port",
        "8000",
        "--tensor-parallel-size",
        "4",
        "--served-model-name",
        "llama2-70b",
        "--max-model-len",
        "4096",
    ]
    assert "--kv-transfer-config" not in c["args"]
    assert c["resources"]["limits"][GPU_RESOURCE] == "4" and c["resources"]["requests"]["cpu"] == "8"
    assert c["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    assert not [e for e in c["env"] if e["name"].startswith("VLLM_NIXL")]
    pod = deployment["spec"]["template"]["spec"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    # Weight loading gets half an hour; readiness and liveness are vLLM's /health.
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert pod["terminationGracePeriodSeconds"] > children.DRAIN_SECONDS
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    products = next(
        t["matchExpressions"][0] for t in terms if t["matchExpressions"][0]["key"] == GPU_PRODUCT_LABEL
    )
    assert "NVIDIA-H100-80GB-HBM3" in products["values"]  # GPU Feature Discovery's label for an H100 SXM


@pytest.mark.parametrize(("role", "kv_role"), [("prefill", "kv_producer"), ("decode", "kv_consumer")])
def test_disaggregated_engines_are_nixl_producers_and_consumers(role: str, kv_role: str) -> None:
    c = container(engine(context(), role))
    config = json.loads(c["args"][c["args"].index("--kv-transfer-config") + 1])
    assert config == {"kv_connector": "NixlConnector", "kv_role": kv_role}
    env = {e["name"]: e for e in c["env"]}
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert {"name": "nixl", "containerPort": children.NIXL_SIDE_CHANNEL_PORT} in c["ports"]


def test_pvc_models_mount_read_only_and_load_from_the_local_path() -> None:
    ctx = context(model={"name": "llama2-70b", "uri": "pvc://weights/llama-2-70b"})
    deployment = engine(ctx)
    c = container(deployment)
    assert c["args"][0] == "/models/weights/llama-2-70b"
    assert {"name": "model", "mountPath": "/models/weights", "readOnly": True} in c["volumeMounts"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in volumes


@pytest.mark.parametrize("uri", ["s3://models/llama-2-70b", "gs://models/llama-2-70b"])
def test_object_store_models_stream_with_runai(uri: str) -> None:
    c = container(engine(context(model={"name": "llama2-70b", "uri": uri})))
    assert c["args"][0] == uri
    assert c["args"][c["args"].index("--load-format") + 1] == "runai_streamer"
    assert c["envFrom"] == [{"secretRef": {"name": "hf-token"}}]


def test_unsupported_schemes_and_conflicting_args_are_rejected() -> None:
    with pytest.raises(children.InvalidEngineSpec, match="not supported"):
        children.model_source("ftp://host/model")
    ctx = context()
    ctx.spec.engine.args = ["--tensor-parallel-size=8"]
    with pytest.raises(children.InvalidEngineSpec, match="contradict the plan"):
        engine(ctx)
    assert children.conflicting_args(["--port", "9000", "--max-model-len", "4096", "-tp", "2"]) == [
        "--port",
        "-tp",
    ]


def test_crd_rejects_bad_uris_and_planned_flags_with_a_message() -> None:
    schema = yaml.safe_load((REPO / "crds" / "ampacity.dev_servingpools.yaml").read_text())
    spec = schema["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    (uri_rule,) = spec["model"]["x-kubernetes-validations"]
    (args_rule,) = spec["engine"]["x-kubernetes-validations"]
    assert "hf://" in uri_rule["message"] and uri_rule["fieldPath"] == ".uri"
    assert "--tensor-parallel-size" in args_rule["rule"] and "--tensor-parallel-size" in args_rule["message"]


def test_engine_pod_fields_merge_under_the_operators() -> None:
    ctx = context(
        engine={
            "image": "vllm/vllm-openai:v0.11.0",
            "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}],
            "envFrom": [{"configMapRef": {"name": "tuning"}}],
            "volumes": [{"name": "cache", "emptyDir": {}}],
            "volumeMounts": [{"name": "cache", "mountPath": "/root/.cache"}],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "nodeSelector": {"pool": "inference"},
            "serviceAccountName": "engines",
            "imagePullSecrets": [{"name": "registry"}],
            "resources": {"limits": {GPU_RESOURCE: "1", "memory": "100Gi"}},
        }
    )
    deployment = engine(ctx, "decode", tp=2)
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"} in c["env"]
    assert c["env"][0]["name"] == "VLLM_NIXL_SIDE_CHANNEL_HOST"
    assert c["envFrom"] == [{"configMapRef": {"name": "tuning"}}]
    assert c["resources"]["limits"] == {GPU_RESOURCE: "2", "memory": "100Gi"}  # the plan's GPUs win
    assert [m["name"] for m in c["volumeMounts"]] == ["dshm", "cache"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"] == {"pool": "inference"}
    assert pod["serviceAccountName"] == "engines" and pod["imagePullSecrets"] == [{"name": "registry"}]


def test_router_discovers_its_engines_in_its_namespace_with_least_privilege() -> None:
    ctx = context()
    colocated = container(children.router_deployment(ctx, ctx.spec, "img", disaggregated=False))
    args = colocated["args"]
    assert colocated["command"] == ["vllm-router"]
    assert "--vllm-pd-disaggregation" not in args
    assert args[args.index("--service-discovery-namespace") + 1] == "team-a"
    assert args[args.index("--service-discovery-port") + 1] == "8000"
    selector = args[args.index("--selector") + 1 : args.index("--selector") + 4]
    assert "app.kubernetes.io/component=engine" in selector
    assert "app.kubernetes.io/instance=llama2-70b-chat" in selector
    pd = container(children.router_deployment(ctx, ctx.spec, "img", disaggregated=True))["args"]
    assert "--vllm-pd-disaggregation" in pd
    prefill = pd[pd.index("--prefill-selector") + 1 : pd.index("--decode-selector")]
    decode = pd[pd.index("--decode-selector") + 1 :]
    assert "app.kubernetes.io/component=prefill" in prefill and "app.kubernetes.io/component=decode" in decode
    # The selectors match the engine pods' labels exactly.
    labels = engine(ctx, "prefill")["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in (s.split("=", 1) for s in prefill))

    account, role, binding = children.router_rbac(ctx)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert role["metadata"]["namespace"] == "team-a"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "team-a"}
    ]
    router = children.router_deployment(ctx, ctx.spec, "img", disaggregated=True)
    assert router["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    service = children.pool_service(ctx, ctx.spec)
    assert service["metadata"]["name"] == "llama2-70b-chat"
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "router"
    assert children.endpoint(ctx, ctx.spec) == "http://llama2-70b-chat.team-a.svc:8000/v1"


def test_prestop_drain_script_waits_for_idle_engine() -> None:
    """The preStop script is valid Python that returns at once when the engine is unreachable."""
    drain = container(engine(context()))["lifecycle"]["preStop"]["exec"]["command"]
    assert drain[:2] == ["python3", "-c"]
    result = subprocess.run([sys.executable, "-c", drain[2], "1", "0", "5"], timeout=30, check=False)
    assert result.returncode == 0
