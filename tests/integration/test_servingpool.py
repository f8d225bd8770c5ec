"""ServingPool on the local control plane: placement, the request path (router + engines), autoscaling.

kwok runs no containers, so the pool's router and engine Deployments never run code here: each
request-path test starts the same router (the real `vllm-router` binary, with the Deployment's
arguments less the Kubernetes discovery) and engines (`ampacity serving engine` with the engine
Deployment's `vllm serve` arguments) as local processes, and talks to them with the `openai` client.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ampacity.dev.cluster.kubectl import Kubectl
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.polling import wait_for
from ampacity.serving.eval.localpool import LocalPool, iter_requests, stop
from controllers.servingpool.children import ROUTER_HEALTH_INTERVAL_SECONDS
from tests.integration.metrics_stub import MetricsStub

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "servingpool.yaml"
WARM_NODE = "gpu-node-3"
CACHE_LABEL = "models.ampacity.dev/llama2-70b"


def test_engine_lands_on_the_node_that_caches_the_weights(
    kubectl: Kubectl, operator: LocalOperator, namespace: str
) -> None:
    pool: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    pool["metadata"]["namespace"] = namespace
    pool["spec"] |= {"mode": "colocated", "minGpus": 0, "workload": {"peakRate": 0.5}}
    kubectl("label", "node", WARM_NODE, f"{CACHE_LABEL}=host")
    try:
        assert kubectl.apply(pool).returncode == 0
        pods = wait_for(
            lambda: [
                p
                for p in kubectl.json(
                    "get",
                    "pods",
                    "-n",
                    namespace,
                    "-l",
                    "ampacity.dev/servingpool,app.kubernetes.io/component=engine",
                )["items"]
                if p.get("spec", {}).get("nodeName")
            ],
            what="engine pod scheduled",
        )
        assert len(pods) == 1
        assert pods[0]["spec"]["nodeName"] == WARM_NODE
        preferred = pods[0]["spec"]["affinity"]["nodeAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        assert preferred[0]["preference"]["matchExpressions"][0]["values"] == [WARM_NODE]
    finally:
        kubectl("label", "node", WARM_NODE, f"{CACHE_LABEL}-")


class EngineMetrics(MetricsStub):
    """A stand-in for a pool's router /metrics: vLLM counters the test advances by hand."""

    def __init__(self) -> None:
        self.requests = 0.0
        self.prompt_tokens = 0.0
        self.output_tokens = 0.0
        super().__init__(
            lambda: (
                f"vllm:request_success_total {self.requests}\n"
                f"vllm:prompt_tokens_total {self.prompt_tokens}\n"
                f"vllm:generation_tokens_total {self.output_tokens}\n"
                "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
            )
        )

    def serve(self, rate: float, prompt: float, output: float, seconds: float) -> None:
        """Account `seconds` of traffic at `rate` req/s with the given mean lengths."""
        self.requests += rate * seconds
        self.prompt_tokens += rate * seconds * prompt
        self.output_tokens += rate * seconds * output


def test_live_metrics_scale_the_right_phase_and_idle_pools_scale_to_zero(
    kubectl: Kubectl, operator: LocalOperator, namespace: str
) -> None:
    engines = EngineMetrics()
    pool: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    pool["metadata"]["namespace"] = namespace
    pool["spec"] |= {
        "mode": "disaggregated",
        "minGpus": 0,
        "maxGpus": 64,
        "autoscaling": {"metricsUrl": engines.url, "cooldown": "10m", "scaleToZeroAfter": "25s"},
    }
    name = pool["metadata"]["name"]

    def sized() -> dict[str, Any]:
        obj = kubectl.get("servingpool", name, namespace)
        return (obj or {}).get("status", {}).get("autoscaling") or {}

    try:
        assert kubectl.apply(pool).returncode == 0
        planned = wait_for(
            lambda: (kubectl.get("servingpool", name, namespace) or {}).get("status", {}).get("plan"),
            what="plan",
        )
        wait_for(lambda: sized().get("prefillReplicas") == planned["prefillReplicas"], what="planned size")
        # A burst of long prompts at four times the planned capacity: prefill grows, decode does not.
        stop = threading.Event()

        def traffic() -> None:
            while not stop.wait(1.0):
                engines.serve(rate=4 * planned["capacity"], prompt=4000, output=50, seconds=1.0)

        threading.Thread(target=traffic, daemon=True).start()
        grown = wait_for(
            lambda: (s := sized()).get("prefillReplicas", 0) > planned["prefillReplicas"] and s,
            timeout=60,
            what="prefill scaled up",
        )
        assert grown["decodeReplicas"] <= planned["decodeReplicas"]
        deployment = kubectl.get("deployment", f"{name}-prefill", namespace)
        wait_for(
            lambda: (
                (kubectl.get("deployment", f"{name}-prefill", namespace) or {})["spec"]["replicas"]
                == grown["prefillReplicas"]
            ),
            what="prefill Deployment resized",
        )
        assert deployment is not None
        # Traffic stops: after scaleToZeroAfter without a request every engine is stopped.
        stop.set()
        idle = wait_for(
            lambda: (s := sized()).get("prefillReplicas") == 0 and s, timeout=90, what="scaled to zero"
        )
        assert idle["decodeReplicas"] == 0 and "scaled to zero" in idle["reason"]
        # One request wakes the pool at its planned size.
        engines.serve(rate=1, prompt=1000, output=200, seconds=1.0)
        woken = wait_for(lambda: (s := sized()).get("prefillReplicas", 0) > 0 and s, timeout=60, what="woken")
        assert woken["decodeReplicas"] >= 1
    finally:
        engines.server.shutdown()


# --- the request path ------------------------------------------------------------------------------


def _pool(namespace: str, mode: str, **spec: Any) -> dict[str, Any]:
    pool: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    pool["metadata"]["namespace"] = namespace
    pool["spec"] |= {"mode": mode, "minGpus": 0, "workload": {"peakRate": 0.5}, **spec}
    # `vllm serve` flags the local engine does not model are left out.
    pool["spec"]["engine"]["args"] = []
    return pool


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _children(kubectl: Kubectl, pool: dict[str, Any], roles: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Wait for the pool's router and engine Deployments; them by role."""
    name, namespace = pool["metadata"]["name"], pool["metadata"]["namespace"]
    assert kubectl.apply(pool).returncode == 0
    names = {role: f"{name}-{role}" for role in (*roles, "router")}
    return wait_for(
        lambda: (
            found
            if all((found := {r: kubectl.get("deployment", n, namespace) for r, n in names.items()}).values())
            else None
        ),
        what="router and engine Deployments",
    )


def _local_pool(tmp_path: Path) -> LocalPool:
    return LocalPool(tmp_path, time_scale=0.1)


def test_disaggregated_pool_prefills_then_decodes_with_the_transferred_kv(
    kubectl: Kubectl, operator: LocalOperator, namespace: str, tmp_path: Path
) -> None:
    pool = _pool(namespace, "disaggregated")
    name = pool["metadata"]["name"]
    deployments = _children(kubectl, pool, ("prefill", "decode"))
    # The pool's one endpoint is the router's Service, with least-privilege discovery RBAC.
    service = kubectl.get("service", name, namespace)
    assert service is not None and service["spec"]["selector"]["app.kubernetes.io/component"] == "router"
    role = kubectl.get("role", f"{name}-router", namespace)
    assert role is not None
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert kubectl.get("rolebinding", f"{name}-router", namespace) is not None
    status = wait_for(
        lambda: (kubectl.get("servingpool", name, namespace) or {}).get("status", {}).get("endpoint")
    )
    assert status == f"http://{name}.{namespace}.svc:8000/v1"
    router_args = _container(deployments["router"])["args"]
    assert "--vllm-pd-disaggregation" in router_args

    with _local_pool(tmp_path) as local:
        prefill = [local.engine(f"prefill-{i}", _container(deployments["prefill"])["args"]) for i in range(2)]
        decode = [local.engine(f"decode-{i}", _container(deployments["decode"])["args"]) for i in range(2)]
        router = local.router(router_args, prefill=[p.url for p in prefill], decode=[d.url for d in decode])
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
        texts = []
        for i in range(4):
            reply = client.completions.create(model="llama2-70b", prompt=list(range(100 + i)), max_tokens=12)
            assert reply.usage is not None and reply.usage.completion_tokens == 12
            chat = client.chat.completions.create(
                model="llama2-70b",
                messages=[{"role": "user", "content": "tell me about pools " * 20}],
                max_tokens=9,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(chat)
            assert chunks[0].choices[0].delta.role == "assistant"
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9
            texts.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        assert all(texts)

        prefilled = {r["x_request_id"]: r for r in iter_requests(prefill)}
        decoded = {r["x_request_id"]: r for r in iter_requests(decode)}
        assert len(prefilled) == len(decoded) == 8
        assert prefilled.keys() == decoded.keys()
        for request_id, first in prefilled.items():
            second = decoded[request_id]
            # Stage one: a non-streamed prefill of max_tokens=1 that asks for a remote decode.
            assert first["max_tokens"] == 1 and first["stream"] is False
            assert first["kv_transfer_params_in"]["do_remote_decode"] is True
            # Stage two: the original request, carrying exactly the params the prefill returned,
            # whose KV blocks it read from that prefill engine.
            assert second["kv_transfer_params_in"] == first["kv_transfer_params_out"]
            assert second["max_tokens"] in (9, 12)
            blocks = first["kv_transfer_params_out"]["remote_block_ids"]
            assert second["kv_loaded_tokens"] == len(blocks) * 16 > 0
        # Both prefill and both decode engines took part (round robin).
        assert {r["engine"] for r in prefilled.values()} == {"prefill-0", "prefill-1"}
        assert {r["engine"] for r in decoded.values()} == {"decode-0", "decode-1"}


def test_killing_a_decode_engine_loses_only_its_own_requests(
    kubectl: Kubectl, operator: LocalOperator, namespace: str, tmp_path: Path
) -> None:
    pool = _pool(namespace, "disaggregated")
    deployments = _children(kubectl, pool, ("prefill", "decode"))
    router_args = _container(deployments["router"])["args"]
    with _local_pool(tmp_path) as local:
        prefill = [local.engine("prefill-0", _container(deployments["prefill"])["args"])]
        decode = [local.engine(f"decode-{i}", _container(deployments["decode"])["args"]) for i in range(2)]
        router = local.router(router_args, prefill=[p.url for p in prefill], decode=[d.url for d in decode])
        client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)

        async def one() -> bool:
            try:
                stream = await client.completions.create(
                    model="llama2-70b", prompt=list(range(300)), max_tokens=60, stream=True
                )
                return len([c async for c in stream]) == 60
            except openai.APIError:
                return False

        async def run() -> tuple[list[bool], list[tuple[float, bool]]]:
            in_flight = [asyncio.create_task(one()) for _ in range(8)]
            await asyncio.sleep(0.3)
            stop(decode[1], signal.SIGKILL)
            killed_at = time.monotonic()
            first = await asyncio.gather(*in_flight)
            later = []
            while time.monotonic() - killed_at < 25:
                later.append((time.monotonic() - killed_at, await one()))
            return first, later

        first, later = asyncio.run(run())
        dead, live = f"127.0.0.1:{decode[1].port}", f"127.0.0.1:{decode[0].port}"

        def sent_to(address: str) -> list[dict[str, Any]]:
            return [
                r
                for r in prefill[0].requests()
                if r["x_request_id"].split("___decode_addr_")[1].startswith(address)
            ]

        # Every request the router sent to the live decode engine completed there; only those it
        # had sent to the killed one (streams under way, or before its health check caught the
        # death) failed, and of those the router may still have retried some on the live one.
        sent_to_dead = sent_to(dead)
        failures = first.count(False) + [ok for _, ok in later].count(False)
        assert 0 < failures <= len(sent_to_dead)
        completed = {r["x_request_id"] for r in decode[0].requests()}
        assert {r["x_request_id"] for r in sent_to(live)} <= completed
        assert all(r["x_request_id"] not in completed for r in sent_to_dead)
        # Once the router's health check has dropped it (two 5 s checks), nothing is lost.
        settled = [ok for t, ok in later if t > 2 * ROUTER_HEALTH_INTERVAL_SECONDS + 3]
        assert settled and all(settled)


def test_colocated_pool_round_robins_and_scale_down_drains(
    kubectl: Kubectl, operator: LocalOperator, namespace: str, tmp_path: Path
) -> None:
    pool = _pool(namespace, "colocated")
    deployments = _children(kubectl, pool, ("engine",))
    router_args = _container(deployments["router"])["args"]
    assert "--vllm-pd-disaggregation" not in router_args
    engine = _container(deployments["engine"])
    assert "--kv-transfer-config" not in engine["args"]
    drain = engine["lifecycle"]["preStop"]["exec"]["command"]
    with _local_pool(tmp_path) as local:
        engines = [local.engine(f"engine-{i}", engine["args"]) for i in range(3)]
        router = local.router(router_args, workers=[e.url for e in engines])
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
        for _ in range(9):
            client.completions.create(model="llama2-70b", prompt="round robin please", max_tokens=2)
        assert sorted(len(e.requests()) for e in engines) == [3, 3, 3]

        # Scale-down of engine-0 as the kubelet does it: preStop (wait until idle), then SIGTERM.
        async def stream() -> int:
            async_client = openai.AsyncOpenAI(
                base_url=engines[0].url + "/v1", api_key="unused", max_retries=0
            )
            reply = await async_client.completions.create(
                model="llama2-70b", prompt=list(range(500)), max_tokens=150, stream=True
            )
            return len([c async for c in reply])

        async def scale_down() -> tuple[list[int], int, str]:
            streams = [asyncio.create_task(stream()) for _ in range(4)]
            await asyncio.sleep(0.5)
            # The drain script the Deployment runs, against this engine's port, without the
            # deregistration pause (the local router does not watch pods).
            pre_stop = await asyncio.create_subprocess_exec(
                sys.executable, "-c", drain[2], str(engines[0].port), "0", drain[5]
            )
            await pre_stop.wait()
            # preStop returned only once the engine had generated every token of its requests.
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(engines[0].url + "/metrics")).text
            code = stop(engines[0])
            return list(await asyncio.gather(*streams)), code, metrics

        lengths, code, metrics = asyncio.run(scale_down())
        assert lengths == [150] * 4
        assert code == 0
        samples = {
            s.name: s.value for family in text_string_to_metric_families(metrics) for s in family.samples
        }
        assert samples["vllm:num_requests_running"] == 0
        assert samples["vllm:generation_tokens_total"] >= 4 * 150
