"""ServingPool placement on the local control plane: engines go where the weights already are."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from ampacity.dev.cluster.kubectl import Kubectl
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.polling import wait_for

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
                for p in kubectl.json("get", "pods", "-n", namespace, "-l", "ampacity.dev/servingpool")[
                    "items"
                ]
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


class EngineMetrics:
    """A stand-in for a pool's router /metrics: vLLM counters the test advances by hand."""

    def __init__(self) -> None:
        self.requests = 0.0
        self.prompt_tokens = 0.0
        self.output_tokens = 0.0
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = (
                    f"vllm:request_success_total {metrics.requests}\n"
                    f"vllm:prompt_tokens_total {metrics.prompt_tokens}\n"
                    f"vllm:generation_tokens_total {metrics.output_tokens}\n"
                    "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/metrics"

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
