"""`ampacity demo`: the whole path on the embedded default, end to end.

Starts the local control plane (building it on first use), installs the CRDs, runs the
operator, applies the samples in examples/ and waits until every one is Ready (or, for the
FederatedRound, Completed). kwok runs no containers, so what a kind needs besides the
operator runs here as local processes, the same commands the chart's pods run:

- PowerBudget: one node agent per fake GPU node (`python -m agents --simulate`), which reports
  simulated H100 telemetry and enforces the caps;
- FederatedRound: the round's aggregator (`ampacity federated aggregator`, reached through the
  operator's aggregator URL override) and a few clients training on the digits data;
- ServingPool: one vLLM-protocol engine per role the pool's plan deploys (`ampacity serving
  engine` with the Deployment's own `vllm serve` arguments) behind the real `vllm-router` with the
  router Deployment's arguments, and one request sent through it with the `openai` client.

It ends by saying where to look next.
"""

from __future__ import annotations

import argparse
import base64
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ampacity.api import RESOURCES
from ampacity.api.cli import CRD_DIRS
from ampacity.dev.cluster.kubectl import Kubectl, condition, install_crds, reconciled
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.localcluster import DEFAULT_STATE_DIR, LocalCluster, free_port
from ampacity.dev.cluster.nodes import GpuNodeShape
from ampacity.dev.cluster.polling import wait_for
from ampacity.federated import tls
from ampacity.serving import hardware
from ampacity.serving.eval.localpool import LocalPool
from controllers.federatedround.controller import (
    ADMIN_TOKEN_KEY,
    CA_CERT_FILE_ENV,
    CA_KEY,
    CA_KEY_FILE_ENV,
    POLL_INTERVAL_ENV,
    PORT_ANNOTATION,
    URL_OVERRIDE_ENV,
    admin_secret_name,
    aggregator_name,
    enrolment_secret_name,
    tls_secret_name,
)
from controllers.servingpool.children import ENGINE_ROLES

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
#: The sample round asks for 20 clients; the demo runs three on this machine, and tolerates one
#: Byzantine client instead of two (trimmedMean needs minQuorum > 2 * byzantineClients). Two of
#: its five rounds show a run of rounds without making the newcomer wait for all five.
DEMO_CLIENTS = 3
DEMO_ROUNDS = 2
DEMO_ROUND = {
    "rounds": DEMO_ROUNDS,
    "cohortSize": DEMO_CLIENTS,
    "minQuorum": DEMO_CLIENTS,
    "deadline": "5m",
    "aggregation": {"rule": "trimmedMean", "trimFraction": 0.2, "byzantineClients": 1},
}
DONE_TIMEOUT_S = 300.0
#: Nodes of other GPU types beside `--nodes` H100 servers: (count, GPU type). The Qwen3-32B pool
#: plans 16 A100s in TP2 and TP4 engines; a third node leaves room however the scheduler spreads them.
EXTRA_NODES = ((1, "h200"), (3, "a100"))


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


class Companions:
    """The local processes standing in for the pods kwok does not run; all stopped together."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with (self.logs / f"{name}.log").open("ab") as log:
            self.running.append(
                subprocess.Popen(
                    [sys.executable, *argv],
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.terminate()
        for process in self.running:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_node_agents(companions: Companions, kubectl: Kubectl, kubeconfig: Path) -> list[str]:
    """One simulated node agent per fake GPU node (admin credentials: a local demo, not the chart)."""
    nodes = [n["metadata"]["name"] for n in kubectl.json("get", "nodes", "-l", "type=kwok")["items"]]
    for node in nodes:
        companions.start(
            f"agent-{node}",
            [
                "-m",
                "agents",
                f"--node={node}",
                "--simulate",
                f"--kubeconfig={kubeconfig}",
                "--metrics-port=0",
            ],
        )
    return nodes


def serve_pool(local: LocalPool, kubectl: Kubectl, pool: dict[str, Any]) -> str:
    """The pool's engines and router as local processes, and one request through its endpoint."""
    import openai  # the dev extra's; imported here so `ampacity --help` stays fast

    name, namespace = pool["metadata"]["name"], pool["metadata"].get("namespace", "default")
    model, gpu = pool["spec"]["model"]["name"], pool["spec"].get("gpuType", "h100")
    try:
        hardware.model(model)
        hardware.gpu(gpu)
    except KeyError:
        return f"not run here: the test engine has no latency model for {model} on {gpu}"

    # Ready: planned, and every child the plan needs applied.
    wait_for(
        lambda: _worked("servingpool", kubectl.get("servingpool", name, namespace)),
        timeout=DONE_TIMEOUT_S,
        what=f"servingpool/{name} to be Ready",
    )
    found = {r: kubectl.get("deployment", f"{name}-{r}", namespace) for r in (*ENGINE_ROLES, "router")}
    children = {r: d for r, d in found.items() if d and d["spec"].get("replicas", 1) > 0}

    def args(role: str) -> list[str]:
        return list(children[role]["spec"]["template"]["spec"]["containers"][0]["args"])

    urls = {
        role: [local.engine(f"{name}-{role}", args(role), gpu=gpu).url]
        for role in ENGINE_ROLES
        if role in children
    }
    router = local.router(
        args("router"),
        workers=urls.get("engine", ()),
        prefill=urls.get("prefill", ()),
        decode=urls.get("decode", ()),
    )
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model=model, prompt="What is a serving pool?", max_tokens=16)
    roles = " + ".join(r for r in ENGINE_ROLES if r in children)
    tokens = reply.usage.completion_tokens if reply.usage else 0
    text = reply.choices[0].text
    return f"{tokens} tokens from {model} through the router at {router.url} ({roles}): {text!r}"


def demo_round(manifest: dict[str, Any], port: int) -> dict[str, Any]:
    """The sample round, sized for the demo's clients, pointing the operator at a local aggregator."""
    round_ = copy.deepcopy(manifest)
    round_["metadata"].setdefault("annotations", {})[PORT_ANNOTATION] = str(port)
    round_["spec"] |= DEMO_ROUND
    return round_


def start_federated(companions: Companions, kubectl: Kubectl, manifest: dict[str, Any], state: Path) -> str:
    """The round's aggregator over HTTPS and its clients, with what the pods would mount: the
    operator's Secrets (admin token for the aggregator, the enrolment token and CA for clients)."""
    name, namespace = manifest["metadata"]["name"], manifest["metadata"].get("namespace", "default")
    port = int(manifest["metadata"]["annotations"][PORT_ANNOTATION])

    def read(secret_name: str) -> dict[str, str]:
        found: dict[str, Any] = wait_for(
            lambda: kubectl.get("secret", secret_name, namespace) or {},
            timeout=120,
            what=f"the Secret {secret_name}",
        )
        return {k: base64.b64decode(v).decode() for k, v in found["data"].items()}

    secrets = {
        "admin": read(admin_secret_name(name)),
        "enrolment": read(enrolment_secret_name(name)),
        "tls": read(tls_secret_name(name)),
    }
    # The round is a new object on a new cluster: an earlier run's aggregator state (its enrolled
    # clients' credentials, its rounds) must not carry over, or the clients are refused (409).
    shutil.rmtree(state / "state", ignore_errors=True)
    tls_dir = state / "tls"
    tls_dir.mkdir(parents=True, exist_ok=True)
    for key in ("tls.crt", "tls.key", CA_KEY):
        (tls_dir / key).write_text(secrets["tls"][key])
    model = state / "initial-model.npz"
    subprocess.run(
        [sys.executable, "-m", "ampacity.cli", "federated", "init-model", f"--out={model}"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    companions.start(
        "aggregator",
        [
            "-m",
            "ampacity.cli",
            "federated",
            "aggregator",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--state-dir={state / 'state'}",
            f"--initial-model={model}",
            f"--tls-cert={tls_dir / 'tls.crt'}",
            f"--tls-key={tls_dir / 'tls.key'}",
        ],
        {
            "AMPACITY_FL_ADMIN_TOKEN": secrets["admin"][ADMIN_TOKEN_KEY],
            "AMPACITY_FL_ENROLMENT_TOKEN": secrets["enrolment"][ADMIN_TOKEN_KEY],
        },
    )
    url = f"https://127.0.0.1:{port}"
    label = ",".join(f"{k}={v}" for k, v in manifest["spec"].get("clientSelector", {}).items())
    for shard in range(DEMO_CLIENTS):
        companions.start(
            f"client-{shard}",
            [
                "-m",
                "ampacity.cli",
                "federated",
                "client",
                f"--url={url}",
                f"--ca-file={tls_dir / CA_KEY}",
                # The certificate names the round's Service; the demo reaches it on 127.0.0.1.
                f"--server-name={aggregator_name(name)}",
                f"--client-id=device-{shard}",
                f"--shard={shard}",
                f"--shards={DEMO_CLIENTS}",
                f"--label={label}",
                "--poll-seconds=0.5",
                # One update per round: a client that left after the first would fail the second.
                f"--tasks={DEMO_ROUNDS}",
                f"--timeout-seconds={DONE_TIMEOUT_S * DEMO_ROUNDS:.0f}",
            ],
            # A client holds the enrolment token, never the admin token.
            {"AMPACITY_FL_ENROLMENT_TOKEN": secrets["enrolment"][ADMIN_TOKEN_KEY]},
        )
    return url


def _finished(kind: str, obj: dict[str, Any] | None) -> bool:
    """Nothing more to wait for: Ready, or for a FederatedRound its end (Completed or Failed)."""
    if kind == "federatedround":
        return (obj or {}).get("status", {}).get("phase") in ("Completed", "Failed")
    return _worked(kind, obj)


def _worked(kind: str, obj: dict[str, Any] | None) -> bool:
    """Ready, or for a FederatedRound Completed (a Failed round finished, but did not work)."""
    if kind == "federatedround":
        return bool((obj or {}).get("status", {}).get("phase") == "Completed")
    ready = condition(obj)
    return reconciled(obj) and ready is not None and ready["status"] == "True"


def _run(args: argparse.Namespace) -> int:
    cluster = LocalCluster(
        args.state_dir, progress=lambda m: print(f"[cluster] {m}", file=sys.stderr, flush=True)
    )
    # Every run starts from an empty cluster: samples left by an earlier run (a round already
    # Completed or Failed) would be applied over, not run again.
    cluster.down()
    cluster.up(nodes=args.nodes)
    # The other samples' GPUs: the Llama-3.1-8B pool asks for H200s, the Qwen3-32B pool for A100s.
    first = args.nodes
    for count, gpu_type in EXTRA_NODES:
        cluster.add_nodes(count, GpuNodeShape(gpu_type=gpu_type), first)
        first += count
    kubectl = Kubectl(cluster.kubeconfig)
    _say("installing CRDs")
    install_crds(kubectl, REPO / CRD_DIRS[0])

    # The CA the chart generates once: the operator issues the round's aggregator its certificate.
    ca_dir = cluster.state_dir / "federated-ca"
    if not (ca_dir / "ca.key").exists():
        ca = tls.new_ca("ampacity demo federated CA")
        ca_dir.mkdir(parents=True, exist_ok=True)
        (ca_dir / "ca.crt").write_bytes(ca.cert_pem)
        (ca_dir / "ca.key").write_bytes(ca.key_pem)
    operator = LocalOperator(
        cluster.kubeconfig,
        cluster.logs / "operator.log",
        # The round's aggregator runs on this machine, not behind its in-cluster Service.
        env={
            URL_OVERRIDE_ENV: "https://127.0.0.1:{port}",
            POLL_INTERVAL_ENV: "1",
            CA_CERT_FILE_ENV: str(ca_dir / "ca.crt"),
            CA_KEY_FILE_ENV: str(ca_dir / "ca.key"),
        },
    )
    _say(f"starting the operator (log: {operator.log})")
    operator.start()
    companions = Companions(cluster.logs)
    # Engines at their modelled speed: the request takes what the pool's GPUs would take.
    local = LocalPool(cluster.logs / "serving")
    samples = [yaml.safe_load(path.read_text()) for path in sorted(EXAMPLES.glob("*.yaml"))]
    samples = [demo_round(s, free_port()) if s["kind"] == "FederatedRound" else s for s in samples]
    finished = False
    try:
        nodes = start_node_agents(companions, kubectl, cluster.kubeconfig)
        _say(f"started {len(nodes)} node agents with simulated GPUs (logs: {cluster.logs}/agent-*.log)")
        for sample in samples:
            _say(f"applying {sample['kind']} {sample['metadata']['name']}")
            kubectl.apply(sample).check_returncode()
        for sample in samples:
            if sample["kind"] == "ServingPool":
                _say(f"serving {sample['metadata']['name']}: {serve_pool(local, kubectl, sample)}")
            if sample["kind"] == "FederatedRound":
                url = start_federated(companions, kubectl, sample, cluster.state_dir / "federated")
                _say(f"started the round's aggregator at {url} and {DEMO_CLIENTS} clients")
        for sample in samples:
            kind, name = sample["kind"].lower(), sample["metadata"]["name"]
            namespace = sample["metadata"].get("namespace")
            _say(f"waiting for {kind}/{name}")

            def done(kind: str = kind, name: str = name, namespace: str | None = namespace) -> bool:
                return _finished(kind, kubectl.get(kind, name, namespace))

            try:
                rounds = DEMO_ROUNDS if kind == "federatedround" else 1
                wait_for(done, timeout=DONE_TIMEOUT_S * rounds, what=f"{kind}/{name} to be Ready")
            except TimeoutError:
                ready = condition(kubectl.get(kind, name, namespace)) or {}
                _say(f"{kind}/{name} is not Ready: {ready.get('reason')}: {ready.get('message')}")
        print(kubectl("get", ",".join(r.plural for r in RESOURCES), "-A", "-o", "wide"))
        print(kubectl("get", "deployments,pods,services", "-n", "default"))
        failed = []
        for s in samples:
            kind, name = s["kind"].lower(), s["metadata"]["name"]
            if not _worked(kind, obj := kubectl.get(kind, name, s["metadata"].get("namespace"))):
                ready = condition(obj) or {}
                failed.append(f"{kind}/{name} ({ready.get('reason')}: {ready.get('message')})")
        finished = not failed
        _say(
            "every sample is Ready (the round Completed)"
            if finished
            else f"some samples did not work: {'; '.join(failed)}"
        )
        _next_steps(cluster, operator, samples)
        if args.keep_running:
            _say("operator, agents, aggregator, the pool's engines and router running; Ctrl-C stops them")
            wait_for(lambda: False, timeout=float("inf"), what="Ctrl-C")
    except KeyboardInterrupt:
        pass
    finally:
        local.close()
        companions.stop_all()
        operator.stop()
    stop = "ampacity cluster" + (
        "" if args.state_dir == DEFAULT_STATE_DIR else f" --state-dir {args.state_dir}"
    )
    _say(f"cluster still up: export KUBECONFIG={cluster.kubeconfig}; stop it with `{stop} down`")
    return 0 if finished else 1


def _next_steps(cluster: LocalCluster, operator: LocalOperator, samples: list[dict[str, Any]]) -> None:
    describe = [
        f"kubectl describe {s['kind'].lower()} {s['metadata']['name']}"
        + (f" -n {s['metadata']['namespace']}" if s["metadata"].get("namespace") else "")
        for s in samples
    ]
    lines = [
        "where to look next:",
        f"  export KUBECONFIG={cluster.kubeconfig}",
        *(f"  {line}   # conditions, plan and events" for line in describe),
        "  kubectl get nodepowers   # per-node caps (spec) and simulated telemetry (status)",
        f"  operator metrics: {operator.metrics_url} (with --keep-running)",
        f"  dashboards: {REPO / 'dashboards'}/*.json (Grafana, over a Prometheus scraping the operator)",
        f"  logs: {cluster.logs} (operator.log, agent-*.log, aggregator.log, client-*.log, serving/)",
    ]
    print("\n".join(lines), flush=True)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser("demo", help="local control plane + operator + the samples in examples/")
    demo.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="cluster state folder")
    demo.add_argument("--nodes", type=int, default=4, help="fake GPU nodes (default 4)")
    demo.add_argument("--keep-running", action="store_true", help="keep the operator running until Ctrl-C")
    demo.set_defaults(func=_run)
