"""Scale from zero on the local control plane: a request held by the activator wakes a pool at zero.

The operator deploys the activator, and the real API server checks its least-privilege RBAC: the
activator here runs as a local process with its Deployment's arguments and its own ServiceAccount's
token, and wakes the pool by patching status.activation. kwok runs no containers, so the test plays
the kubelet for the pool's processes, as the request-path tests do: when the engine Deployments'
replicas go up it starts the engines (`ampacity serving engine` with the Deployments' `vllm serve`
arguments and env) and then the real `vllm-router`, on ports fixed in advance so that the
activator, given them instead of the pods it would discover, can reach them; when the replicas go
to zero it stops them. The pool's idle time comes from its engines' metrics through a relay that
answers zeros while no engine runs (a Prometheus endpoint of the pool, as metricsUrl expects).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ampacity.dev.cluster.kubectl import Kubectl
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.polling import wait_for
from ampacity.serving.eval.localpool import LocalPool, LocalProcess, free_port, stop
from tests.integration.metrics_stub import MetricsStub

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "servingpool.yaml"
MODEL = "llama2-70b"
IDLE_METRICS = (
    "vllm:request_success_total 0\nvllm:prompt_tokens_total 0\nvllm:generation_tokens_total 0\n"
    "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
)


class MetricsRelay(MetricsStub):
    """The pool's metrics endpoint: the decode engine's /metrics while it runs, zeros otherwise."""

    def __init__(self, source: str) -> None:
        def body() -> str:
            try:
                return httpx.get(source, timeout=2).text
            except httpx.HTTPError:
                return IDLE_METRICS

        super().__init__(body)


def _container(deployment: Any) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


class Kubelet(threading.Thread):
    """Starts the pool's engines and router when its engine Deployments scale up, stops them at zero."""

    def __init__(self, kubectl: Kubectl, namespace: str, name: str, local: LocalPool, ports: dict[str, int]):
        super().__init__(daemon=True)
        self.kubectl, self.namespace, self.name, self.local, self.ports = (
            kubectl,
            namespace,
            name,
            local,
            ports,
        )
        self.starting = True
        """False: a kubelet that cannot start the engines (the wake then outlasts the wait limit)."""
        self.starts = 0
        self.running: list[LocalProcess] = []
        self.engines: list[LocalProcess] = []
        self._halted = threading.Event()
        self.errors: list[str] = []

    def replicas(self) -> dict[str, tuple[int, dict[str, Any]]]:
        found = self.kubectl.json(
            "get", "deployments", "-n", self.namespace, "-l", f"ampacity.dev/servingpool={self.name}"
        )["items"]
        return {
            d["metadata"]["labels"]["app.kubernetes.io/component"]: (d["spec"]["replicas"], d) for d in found
        }

    def run(self) -> None:
        while not self._halted.wait(0.3):
            try:
                deployments = self.replicas()
                up = all(deployments.get(r, (0, {}))[0] > 0 for r in ("prefill", "decode"))
                if up and not self.running and self.starting:
                    self._start(deployments)
                elif not up and self.running:
                    self._halt()
            except Exception as error:  # surfaced by the test, not lost in a thread
                self.errors.append(repr(error))

    def _start(self, deployments: dict[str, tuple[int, dict[str, Any]]]) -> None:
        # Counted first: a held request may complete as soon as the router listens, before the
        # router's health wait here returns.
        self.starts += 1
        for role in ("prefill", "decode"):
            container = _container(deployments[role][1])
            env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
            self.engines.append(
                self.local.engine(f"{role}-{self.starts}", container["args"], port=self.ports[role], env=env)
            )
            self.running.append(self.engines[-1])
        router = _container(deployments["router"][1])["args"]
        self.running.append(
            self.local.router(
                router,
                port=self.ports["router"],
                prefill=[f"http://127.0.0.1:{self.ports['prefill']}"],
                decode=[f"http://127.0.0.1:{self.ports['decode']}"],
            )
        )

    def _halt(self) -> None:
        for proc in reversed(self.running):
            stop(proc)
        self.running = []

    def close(self) -> None:
        self._halted.set()
        self.join(timeout=30)


def _activator_kubeconfig(kubectl: Kubectl, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig with the activator ServiceAccount's own token (its Role is all it may do)."""
    token = kubectl("create", "token", account, "-n", namespace, "--duration", "1h").strip()
    admin = yaml.safe_load(kubectl.kubeconfig.read_text())
    cluster = admin["clusters"][0]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [{"name": account, "user": {"token": token}}],
                "contexts": [{"name": "activator", "context": {"cluster": cluster["name"], "user": account}}],
                "current-context": "activator",
            }
        )
    )
    return path


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/activator/metrics", timeout=5).text
    return sum(
        s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name
    )


def test_a_pool_at_zero_is_woken_by_held_requests_and_refuses_past_its_wait_limit(
    kubectl: Kubectl, operator: LocalOperator, namespace: str, tmp_path: Path
) -> None:
    ports = {role: free_port() for role in ("prefill", "decode", "router")}
    relay = MetricsRelay(f"http://127.0.0.1:{ports['decode']}/metrics")
    pool: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    name = pool["metadata"]["name"]
    pool["metadata"]["namespace"] = namespace
    pool["spec"] |= {
        "mode": "disaggregated",
        "minGpus": 0,
        "workload": {"peakRate": 0.5},
        "autoscaling": {"metricsUrl": relay.url, "cooldown": "10m", "scaleToZeroAfter": "15s"},
        "activator": {"maxQueue": 100, "maxWait": "90s"},
    }
    pool["spec"]["engine"]["args"] = []

    def status() -> dict[str, Any]:
        found: dict[str, Any] = (kubectl.get("servingpool", name, namespace) or {}).get("status", {})
        return found

    assert kubectl.apply(pool).returncode == 0
    activator = wait_for(lambda: kubectl.get("deployment", f"{name}-activator", namespace), what="activator")
    service = kubectl.get("service", name, namespace)
    assert service is not None and service["spec"]["selector"]["app.kubernetes.io/component"] == "activator"
    # Idle from the start: after scaleToZeroAfter every engine is stopped.
    wait_for(lambda: status().get("tier") == "stopped", timeout=120, what="pool at zero")

    kubeconfig = _activator_kubeconfig(
        kubectl, namespace, f"{name}-activator", tmp_path / "activator.kubeconfig"
    )
    # Least privilege, as the API server sees it: its own pool's status, nothing that scales.
    identity = Kubectl(kubeconfig)
    allowed = {
        what: identity.run("auth", "can-i", *what.split(), "-n", namespace).stdout.strip()
        for what in (
            f"patch servingpools.ampacity.dev/{name} --subresource=status",
            "patch servingpools.ampacity.dev/other --subresource=status",
            f"patch servingpools.ampacity.dev/{name}",
            "patch deployments",
            "list pods",
        )
    }
    assert list(allowed.values()) == ["yes", "no", "no", "no", "yes"], allowed
    engines = [
        f"--engine=prefill=http://127.0.0.1:{ports['prefill']}",
        f"--engine=decode=http://127.0.0.1:{ports['decode']}",
    ]
    fixed = [*engines, "--upstream", f"http://127.0.0.1:{ports['router']}"]
    with LocalPool(tmp_path / "pool", time_scale=0.1) as local:
        kubelet = Kubelet(kubectl, namespace, name, local, ports)
        kubelet.start()
        try:
            front = local.activator(_container(activator)["args"], fixed, {"KUBECONFIG": str(kubeconfig)})
            client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=120)

            # One request at zero: held, the pool wakes (both phases), the request completes.
            reply = client.completions.create(model=MODEL, prompt="wake up please", max_tokens=8)
            assert reply.usage is not None and reply.usage.completion_tokens == 8
            assert kubelet.starts == 1 and not kubelet.errors
            woken = wait_for(lambda: (s := status()).get("activation", {}).get("lastWaitSeconds") and s)
            assert woken["activation"]["wakes"] >= 1
            print(f"first request waited {woken['activation']['lastWaitSeconds']:.2f}s for the pool to wake")
            assert _metric(front.url, "ampacity_activator_wait_seconds_count") == 1

            # Idle again, back to zero; then a burst of 50 at zero: every one completes.
            wait_for(
                lambda: status().get("tier") == "stopped" and not kubelet.running, timeout=120, what="zero"
            )

            async def burst() -> list[int]:
                async_client = openai.AsyncOpenAI(
                    base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=180
                )

                async def one(i: int) -> int:
                    if i % 2:
                        stream = await async_client.completions.create(
                            model=MODEL, prompt=f"burst {i}", max_tokens=6, stream=True
                        )
                        return len([c async for c in stream])
                    done = await async_client.completions.create(
                        model=MODEL, prompt=f"burst {i}", max_tokens=6
                    )
                    assert done.usage is not None
                    return done.usage.completion_tokens

                return list(await asyncio.gather(*(one(i) for i in range(50))))

            assert asyncio.run(burst()) == [6] * 50
            assert kubelet.starts == 2 and not kubelet.errors
            decoded = [r for r in kubelet.engines[-1].requests() if r.get("status") == 200]
            assert len(decoded) == 50
            assert _metric(front.url, "ampacity_activator_wait_seconds_count") == 51

            # A shorter wait limit, and a kubelet that cannot start the engines: 503, Retry-After, why.
            kubelet.starting = False
            pool["spec"]["activator"]["maxWait"] = "3s"
            assert kubectl.apply(pool).returncode == 0
            shorter = wait_for(
                lambda: (
                    (d := kubectl.get("deployment", f"{name}-activator", namespace))
                    and "3s" in _container(d)["args"]
                    and d
                ),
                what="activator with the new limit",
            )
            stop(front)
            front = local.activator(_container(shorter)["args"], fixed, {"KUBECONFIG": str(kubeconfig)})
            client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            wait_for(
                lambda: status().get("tier") == "stopped" and not kubelet.running,
                timeout=120,
                what="zero again",
            )
            try:
                client.completions.create(model=MODEL, prompt="too late", max_tokens=4)
            except openai.APIStatusError as refused:
                assert refused.status_code == 503
                assert int(refused.response.headers["Retry-After"]) >= 1
                assert "did not become ready within 3s" in refused.message
                assert "activator.maxWait" in refused.message
            else:
                raise AssertionError("a request past the wait limit was served")
            assert _metric(front.url, "ampacity_activator_requests_total") == 1  # the refused one
        finally:
            kubelet.close()
            relay.server.shutdown()
