"""Dashboards and rules against a real Prometheus scraping a real end-to-end run.

A `prometheus` process (Debian's package; tools/test.sh installs it) scrapes every second the
operator, one simulated node agent per GPU node and a FederatedRound aggregator, and evaluates
rules/ampacity.rules.yaml. The run applies a ServingPool, two TrainingJobs (one reports a
committed checkpoint, one does not), a PowerBudget over the agents' nodes under load and a
FederatedRound that two demo clients complete. Then every expression of every dashboard panel,
dashboard variable and rule must parse (the query API answers 400 otherwise) and return data;
alert expressions are evaluated with `bool` comparisons, so they return data while nothing fires.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ampacity.dev.cluster.binaries import ensure_binaries
from ampacity.dev.cluster.kubectl import Kubectl
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.localcluster import LocalCluster, free_port
from ampacity.dev.cluster.polling import wait_for
from ampacity.observability import (
    DASHBOARDS,
    RULES,
    Query,
    dashboard_queries,
    rule_queries,
    substitute,
    with_bool,
)
from ampacity.training.sdk.report import CheckpointReport, TrainerReport

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CHART = REPO / "helm" / "ampacity"
URL_OVERRIDE_ENV = "AMPACITY_AGGREGATOR_URL_OVERRIDE"
BUDGET = "e2e-observability"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: tools/test.sh installs Debian's prometheus package")
    return path


class Processes:
    """Child processes of the test, each with a log file, stopped together."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                args, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, cwd=self.logs
            )
        self.running.append((process, log))
        return process

    def check(self) -> None:
        for process, log in self.running:
            code = process.poll()
            if code not in (None, 0):
                raise AssertionError(f"{log.name} exited with {code}:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        for process, _ in reversed(self.running):
            if process.poll() is None:
                process.terminate()
        for process, _ in self.running:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Prometheus:
    """A local Prometheus on a free loopback port."""

    def __init__(
        self,
        processes: Processes,
        workdir: Path,
        targets: dict[str, list[str]],
        labels: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(REPO / RULES)],
            "scrape_configs": [
                # honor_labels: per-object series carry their object's `namespace`, as with the chart's
                # ServiceMonitor (honorLabels: true).
                # `labels`: what the chart's PodMonitors add from the pod's labels (the engines').
                {
                    "job_name": job,
                    "honor_labels": True,
                    "static_configs": [{"targets": hosts, "labels": (labels or {}).get(job, {})}],
                }
                for job, hosts in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        processes.start(
            "prometheus",
            [
                binary("prometheus"),
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
        )
        wait_for(self._ready, timeout=60, what="prometheus ready")

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> tuple[int, dict[str, Any]]:
        response = httpx.post(f"{self.url}/api/v1/query", data={"query": expr}, timeout=10)
        return response.status_code, response.json()

    def get(self, path: str) -> Any:
        return httpx.get(f"{self.url}{path}", timeout=10).json()["data"]


def start_engine(run: Processes, pool: dict[str, Any]) -> str:
    """The test engine (`ampacity serving engine`) serving the pool's model on a free port."""
    port = free_port()
    model = pool["spec"]["model"]["name"]
    cli = [sys.executable, "-m", "ampacity.cli", "serving", "engine", model, "--role", "colocated"]
    # TP 4: a 70B model does not fit one GPU (the engine would admit no context at all).
    run.start("engine", [*cli, "--port", str(port), "--tensor-parallel-size", "4", "--time-scale", "0.05"])
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        run.check()
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout=120, what="the engine's /health")
    return url


class Traffic:
    """A few completions a second against the engine until stopped (bounded: at most 2,000)."""

    def __init__(self, url: str, model: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, args=(url, model), daemon=True)
        self._thread.start()

    def _send(self, url: str, model: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(2000):
                if self._stop.wait(0.3):
                    return
                body = {"model": model, "prompt": "the quick brown fox", "max_tokens": 8}
                with contextlib.suppress(httpx.HTTPError):
                    client.post("/v1/completions", json=body)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=35)


def load(kind: str, namespace: str | None) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load((EXAMPLES / f"{kind}.yaml").read_text())
    if namespace:
        manifest["metadata"]["namespace"] = namespace
    return manifest


def secret_value(kubectl: Kubectl, name: str, namespace: str, key: str = "token") -> str | None:
    if not kubectl.ok("get", "secret", name, "-n", namespace):
        return None
    data = kubectl.json("get", "secret", name, "-n", namespace).get("data") or {}
    return base64.b64decode(data[key]).decode() if data.get(key) else None


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.stop()


@pytest.fixture
def operator_reaching_local_aggregators(operator: LocalOperator) -> Iterator[LocalOperator]:
    """The operator, restarted if need be so that it reaches aggregators on this machine."""
    before = operator.env.get(URL_OVERRIDE_ENV)
    if before is None:
        operator.env[URL_OVERRIDE_ENV] = "http://127.0.0.1:{port}"
        operator.stop()
        operator.start()
    yield operator
    if before is None:
        del operator.env[URL_OVERRIDE_ENV]
        operator.stop()
        operator.start()


def start_agents(run: Processes, cluster: LocalCluster, nodes: list[str], load_file: Path) -> list[str]:
    """One simulated node agent per node (8 H100s each), busy; returns their metrics addresses."""
    load_file.write_text(json.dumps({"prompt": 0.7, "token": 0.3}))
    addresses = []
    for node in nodes:
        port = free_port()
        run.start(
            f"agent-{node}",
            [
                sys.executable,
                "-m",
                "agents",
                f"--node={node}",
                "--simulate",
                "--gpus=8",
                f"--load-file={load_file}",
                f"--kubeconfig={cluster.kubeconfig}",
                f"--metrics-port={port}",
                "--metrics-address=127.0.0.1",
                "--interval=1",
            ],
        )
        addresses.append(f"127.0.0.1:{port}")
    return addresses


def report_checkpoint(kubectl: Kubectl, operator: LocalOperator, namespace: str, job: str) -> None:
    """Play rank 0 of the job's trainer: report progress and a committed checkpoint."""
    token = wait_for(
        lambda: secret_value(kubectl, f"{job}-report-token", namespace), timeout=60, what="report token"
    )
    now = datetime.now(UTC)
    report = TrainerReport(
        namespace=namespace,
        job=job,
        rank=0,
        world_size=4,
        step=100,
        sent_at=now,
        step_seconds=0.5,
        checkpoint=CheckpointReport(
            step=100,
            location="s3://checkpoints/step-100",
            size_bytes=1 << 20,
            stall_seconds=0.2,
            persist_seconds=1.5,
            committed=True,
            finished_at=now,
        ),
    )
    url = f"{operator.report_url}/v1/namespaces/{namespace}/trainingjobs/{job}/reports"
    answers: list[str] = []

    def accepted() -> bool:
        response = httpx.post(
            url,
            content=report.model_dump_json(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=10,
        )
        answers.append(f"{response.status_code} {response.text}")
        return response.status_code == 200

    try:
        wait_for(accepted, timeout=60, what="checkpoint report accepted")
    except TimeoutError as error:
        raise AssertionError(f"the operator refused the report: {answers[-1:]}") from error


def start_federated_round(run: Processes, kubectl: Kubectl, namespace: str, workdir: Path, port: int) -> None:
    """A two-client FedAvg round: the operator opens it, two demo clients complete it."""
    round_ = {
        "apiVersion": "ampacity.dev/v1alpha1",
        "kind": "FederatedRound",
        "metadata": {
            "name": "e2e-round",
            "namespace": namespace,
            "annotations": {"ampacity.dev/aggregator-port": str(port)},
        },
        "spec": {
            "model": "file:///state/global-model.npz",
            "clientSelector": {"federated.ampacity.dev/population": "e2e"},
            "cohortSize": 2,
            "minQuorum": 2,
            "deadline": "2m",
            "strategy": "fedavg",
            "localSteps": {"min": 1, "max": 3},
            "aggregation": {"rule": "mean"},
            # This test is about metrics, not TLS (test_federatedround.py covers it): plain HTTP, asked for.
            "aggregator": {"insecureHTTP": True},
        },
    }
    assert kubectl.apply(round_).returncode == 0
    token = wait_for(
        lambda: secret_value(kubectl, "e2e-round-aggregator-admin", namespace), timeout=60, what="admin token"
    )
    model = workdir / "global-model.npz"
    cli = [sys.executable, "-m", "ampacity.cli", "federated"]
    subprocess.run([*cli, "init-model", f"--out={model}"], check=True, capture_output=True, timeout=120)
    enrolment = wait_for(
        lambda: secret_value(kubectl, "e2e-round-aggregator-enrolment", namespace),
        timeout=60,
        what="enrolment token",
    )
    env = {"AMPACITY_FL_ADMIN_TOKEN": token, "AMPACITY_FL_ENROLMENT_TOKEN": enrolment}
    run.start(
        "aggregator",
        [
            *cli,
            "aggregator",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--state-dir={workdir / 'aggregator'}",
            f"--initial-model={model}",
            "--insecure-http",
        ],
        env,
    )
    url = f"http://127.0.0.1:{port}"
    for shard in range(2):
        run.start(
            f"client-{shard}",
            [
                *cli,
                "client",
                f"--url={url}",
                f"--client-id=e2e-{shard}",
                f"--shard={shard}",
                "--shards=2",
                "--label=federated.ampacity.dev/population=e2e",
                "--seconds-per-step=0.01",
                "--tasks=1",
                "--timeout-seconds=240",
            ],
            {"AMPACITY_FL_ENROLMENT_TOKEN": enrolment},
        )


def activity(namespace: str) -> list[Query]:
    """What the run must have done, beyond every series existing: queries that must return data."""
    ns = f'namespace="{namespace}"'
    return [
        Query(
            "activity: the round completed at the aggregator",
            'ampacity_fl_rounds_total{phase="completed"} > 0',
        ),
        Query(
            "activity: the operator saw both updates",
            f'ampacity_federatedround_received_updates{{{ns}, name="e2e-round"}} >= 2',
        ),
        Query(
            "activity: the round is closed", f'ampacity_federatedround_open{{{ns}, name="e2e-round"}} == 0'
        ),
        Query(
            "activity: the checkpoint reached the metrics",
            f'ampacity_trainingjob_last_checkpoint_timestamp_seconds{{{ns}, name="gpt-pretrain"}}',
        ),
        Query("activity: engines are ready", f"ampacity_servingpool_ready_replicas{{{ns}}} > 0"),
        Query(
            "activity: the budget sees the agents' power",
            f'ampacity_powerbudget_power_watts{{name="{BUDGET}"}} > 0',
        ),
        Query("activity: the GPUs use energy", "rate(ampacity_gpu_energy_joules_total[1m]) > 0"),
        Query(
            "activity: the busy GPUs were capped", f'ampacity_powerbudget_capped_gpus{{name="{BUDGET}"}} > 0'
        ),
        Query("activity: the agents set the caps", "sum(ampacity_gpu_cap_changes_total) > 0"),
        # An alert goes pending end to end, for the job that never checkpoints.
        Query(
            "activity: AmpacityTrainingJobNoCheckpoint pending",
            f'ALERTS{{alertname="AmpacityTrainingJobNoCheckpoint", {ns}, name="never-checkpoints"}}',
        ),
    ]


def missing_data(prometheus: Prometheus, queries: list[Query]) -> dict[str, str]:
    """The queries that fail to parse or return nothing, with why."""
    failures = {}
    for query in queries:
        expr = substitute(query.expr)
        if query.kind == "alert":
            expr = with_bool(expr)
        status, body = prometheus.query(expr)
        if status == 400:
            raise AssertionError(f"{query.source}: does not parse: {body.get('error')}\n{expr}")
        if status != 200 or body.get("status") != "success":
            failures[query.source] = f"HTTP {status}: {body.get('error')}"
        elif not body["data"]["result"]:
            failures[query.source] = f"no data: {expr}"
        elif query.kind == "record":
            # The rule itself ran in Prometheus and wrote its series.
            _, recorded = prometheus.query(query.record)
            if not recorded["data"]["result"]:
                failures[query.source] = f"{query.record} not recorded yet"
    return failures


def test_every_dashboard_panel_and_rule_returns_data(
    cluster: LocalCluster,
    kubectl: Kubectl,
    operator_reaching_local_aggregators: LocalOperator,
    namespace: str,
    run: Processes,
    tmp_path: Path,
) -> None:
    operator = operator_reaching_local_aggregators
    aggregator_port = free_port()
    budget = load("powerbudget", None)
    budget["metadata"]["name"] = BUDGET
    selector = ",".join(f"{k}={v}" for k, v in budget["spec"]["nodeSelector"]["matchLabels"].items())
    nodes = [n["metadata"]["name"] for n in kubectl.json("get", "nodes", "-l", selector)["items"]]
    assert nodes, f"no node matches {selector}"
    agents = start_agents(run, cluster, nodes, tmp_path / "load.json")
    # kwok runs no containers: one vLLM-protocol engine stands for the pool's engines, scraped by
    # Prometheus with the labels its PodMonitor gives them and read by the pool's autoscaling.
    pool = load("servingpool", namespace)
    engine = start_engine(run, pool)
    pool["spec"]["autoscaling"] = {"metricsUrl": f"{engine}/metrics"}
    prometheus = Prometheus(
        run,
        tmp_path,
        {
            "ampacity-operator": [operator.metrics_url.split("/")[2]],
            "ampacity-node-agent": agents,
            "ampacity-aggregator": [f"127.0.0.1:{aggregator_port}"],
            "ampacity-engine": [engine.split("/")[2]],
        },
        labels={
            "ampacity-engine": {"namespace": namespace, "name": pool["metadata"]["name"], "role": "engine"}
        },
    )
    traffic = Traffic(engine, pool["spec"]["model"]["name"])

    # Every kind, and the activity each dashboard shows.
    assert kubectl.apply(pool).returncode == 0
    jobs = load("trainingjob", namespace)
    assert kubectl.apply(jobs).returncode == 0
    jobs["metadata"]["name"] = "never-checkpoints"
    assert kubectl.apply(jobs).returncode == 0
    assert kubectl.apply(budget).returncode == 0
    try:
        start_federated_round(run, kubectl, namespace, tmp_path, aggregator_port)
        report_checkpoint(kubectl, operator, namespace, "gpt-pretrain")

        queries = [q for path in sorted((REPO / DASHBOARDS).glob("*.json")) for q in dashboard_queries(path)]
        queries += rule_queries(REPO / RULES) + activity(namespace)
        failures: dict[str, str] = {}

        def all_have_data() -> bool:
            nonlocal failures
            run.check()
            failures = missing_data(prometheus, queries)
            return not failures

        try:
            wait_for(all_have_data, timeout=240, interval=3, what="every query returning data")
        except TimeoutError as error:
            details = "\n".join(f"  {source}: {why}" for source, why in sorted(failures.items()))
            raise AssertionError(f"queries without data after the run:\n{details}") from error

        # Prometheus scraped every exporter, and evaluated every rule without an error.
        targets = prometheus.get("/api/v1/targets")["activeTargets"]
        assert {t["health"] for t in targets} == {"up"}, [(t["scrapeUrl"], t["lastError"]) for t in targets]
        rules = [r for group in prometheus.get("/api/v1/rules")["groups"] for r in group["rules"]]
        assert len(rules) == len(rule_queries(REPO / RULES))
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        # ... and not for the job that reported a complete checkpoint.
        _, alerts = prometheus.query(
            f'ALERTS{{alertname="AmpacityTrainingJobNoCheckpoint", namespace="{namespace}"}}'
        )
        assert {a["metric"]["name"] for a in alerts["data"]["result"]} == {"never-checkpoints"}
    finally:
        traffic.stop()
        kubectl.run("delete", "powerbudget", BUDGET, "--wait=false")


def helm_template(*args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [ensure_binaries(verbose=False)["helm"], "template", "ampacity", str(CHART), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_chart_ships_monitors_rules_and_dashboards(kubectl: Kubectl) -> None:
    enabled = [
        "--set=serviceMonitor.enabled=true",
        "--set=prometheusRule.enabled=true",
        "--set=nodeAgent.enabled=true",
    ]
    # Without the Prometheus Operator's API the chart renders no monitors and no rule.
    plain = helm_template(*enabled)
    assert not {d["kind"] for d in plain} & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    # Dashboards are off by default.
    assert not [d for d in plain if "grafana_dashboard" in d["metadata"].get("labels", {})]
    apis = [f"--api-versions=monitoring.coreos.com/v1/{kind}" for kind in ("ServiceMonitor", "PodMonitor")]
    apis.append("--api-versions=monitoring.coreos.com/v1/PrometheusRule")
    rendered = helm_template(*enabled, *apis, "--set=dashboards.enabled=true")
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in rendered:
        by_kind.setdefault(doc["kind"], []).append(doc)

    (monitor,) = by_kind["ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True  # keep the objects' namespace label
    assert {m["metadata"]["name"] for m in by_kind["PodMonitor"]} == {
        "ampacity-node-agent",
        "ampacity-aggregators",
        "ampacity-serving-engines",
        "ampacity-serving-routers",
    }
    (rule,) = by_kind["PrometheusRule"]
    assert rule["spec"]["groups"] == yaml.safe_load((REPO / RULES).read_text())["groups"]

    dashboards = {
        name: json.loads(text)
        for cm in by_kind["ConfigMap"]
        if cm["metadata"]["labels"].get("grafana_dashboard") == "1"
        for name, text in cm["data"].items()
    }
    sources = sorted((REPO / DASHBOARDS).glob("*.json"))
    assert dashboards == {f"ampacity-{p.stem}.json": json.loads(p.read_text()) for p in sources}
    # The API server takes them as they are (names, labels, size).
    manifest = yaml.safe_dump_all(
        [{**cm, "metadata": {**cm["metadata"], "namespace": "default"}} for cm in by_kind["ConfigMap"]]
    )
    result = kubectl.run("apply", "--dry-run=server", "-f", "-", stdin=manifest)
    assert result.returncode == 0, result.stderr
