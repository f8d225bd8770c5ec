"""Dashboards, rules and metric names, without a cluster.

- the chart's copies of dashboards/ and rules/ have not drifted (`ampacity observability sync`);
- every dashboard is a Grafana model on the `${datasource}` variable, and the five are there;
- `promtool check rules` and `promtool test rules` pass (tools/test.sh installs promtool);
- every metric the code exports follows the Prometheus naming conventions and has a row in the
  README's metrics table, and every dashboard and rule reads only exported metrics or recorded series.

tests/integration/test_observability.py runs the same queries against a live Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.registry import REGISTRY, Collector

from agents.metrics import AgentMetrics, GpuSample
from ampacity.federated.aggregator import Metrics as AggregatorMetrics
from ampacity.observability import (
    DASHBOARDS,
    RULES,
    RULES_TEST,
    dashboard_queries,
    metric_names,
    rule_queries,
    stale_files,
)
from ampacity.serving.activator import ActivatorMetrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_NAMES = {"overview", "serving", "power", "training", "federated"}
#: Base units a name may end in (before `_total`), and units that are not base units.
BASE_UNITS = ("seconds", "bytes", "joules", "watts", "ratio", "info", "requests_per_second")
NOT_BASE = re.compile(
    r"_(milliseconds|ms|minutes|hours|kilowatts|kw|kilobytes|megabytes|percent|millijoules|milliwatts)(_|$)"
)
#: Exported names that break a convention, each with the rename it waits for (keep this empty).
PENDING_RENAMES = {
    # The unit goes last: owned by the TrainingJob controller, renamed together with its dashboards.
    "ampacity_trainingjob_gpu_seconds_lost": "ampacity_trainingjob_lost_gpu_seconds",
}
README_ROW = re.compile(r"^\|\s*`(ampacity_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: tools/test.sh installs it "
            "(apt-get install -y --no-install-recommends prometheus)"
        )
    return path


def _families(registry: CollectorRegistry | Collector) -> dict[str, str]:
    """Exposed metric name -> type, for the ampacity_* families of a registry."""
    names = {}
    for family in registry.collect():
        if not family.name.startswith("ampacity_"):
            continue
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        # An info metric is exposed as a gauge with value 1.
        names[family.name + suffix] = "gauge" if family.type == "info" else family.type
    return names


def exported_metrics() -> dict[str, str]:
    """Every metric the operator, node agent, FL aggregator and activator export, with its type."""
    import controllers.metrics  # noqa: F401  (registers the operator's metrics in REGISTRY)

    agent = AgentMetrics("node")
    agent.record([GpuSample(0, 100.0, 1.0, 700.0)], failsafe=False)
    registry = CollectorRegistry()
    AggregatorMetrics(registry)
    ActivatorMetrics("pool", registry)
    return {**_families(REGISTRY), **_families(agent.registry), **_families(registry)}


def documented_metrics() -> dict[str, str]:
    """The README's metrics table: name -> type."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = [README_ROW.match(line) for line in section.splitlines()]
    return {m.group(1): m.group(2) for m in rows if m}


def test_chart_copies_have_not_drifted() -> None:
    stale = stale_files(REPO)
    assert not stale, f"run `ampacity observability sync`: {[str(p.relative_to(REPO)) for p in stale]}"


def test_dashboards_are_grafana_models_on_the_datasource_variable() -> None:
    files = sorted((REPO / DASHBOARDS).glob("*.json"))
    assert {f.stem for f in files} >= DASHBOARD_NAMES
    uids = set()
    for path in files:
        model = json.loads(path.read_text())
        assert model["uid"] not in uids, f"{path.name}: uid {model['uid']} used twice"
        uids.add(model["uid"])
        assert model["title"].startswith("Ampacity / ") and "ampacity" in model["tags"]
        variables = {v["name"]: v for v in model["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in model["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in model["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], f"{path.name}: panel {panel['title']!r} has no query"
            for target in panel["targets"]:
                assert target["expr"].strip() and target["datasource"]["uid"] == "${datasource}"
        for query in dashboard_queries(path):
            used = {m[1:].split(":")[0].strip("{}") for m in re.findall(r"\$\{?\w+(?::\w+)?\}?", query.expr)}
            unknown = used - set(variables) - {"__rate_interval", "__interval", "__range"}
            assert not unknown, f"{query.source}: undefined variables {unknown}"


def test_rules_pass_promtool_check() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(REPO / RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_pass_their_promtool_unit_tests() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", RULES_TEST.name],
        cwd=REPO / RULES_TEST.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_cover_the_issue_alerts() -> None:
    alerts = {q.source.split("alert ", 1)[1] for q in rule_queries(REPO / RULES) if q.kind == "alert"}
    assert {
        "AmpacityPowerBudgetAboveT2",
        "AmpacityServingPoolMissingSLO",
        "AmpacityTrainingJobCheckpointStale",
        "AmpacityTrainingJobNoCheckpoint",
        "AmpacityFederatedRoundPastDeadline",
    } <= alerts


def test_metric_names_follow_prometheus_conventions() -> None:
    for name, kind in exported_metrics().items():
        if name in PENDING_RENAMES:
            continue
        assert re.fullmatch(r"ampacity_[a-z0-9_]+", name), name
        assert not NOT_BASE.search(name), f"{name}: use base units (seconds, bytes, joules, watts)"
        if kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), f"{name}: only counters end in _total"
        if kind == "histogram":
            assert name.endswith(("_seconds", "_bytes")), f"{name}: a histogram needs a unit"
        for unit in ("seconds", "joules", "watts", "bytes"):
            inner = f"_{unit}_" in name and not name.endswith(f"_{unit}_total")
            assert not inner, f"{name}: the unit goes last (before _total)"


def test_readme_documents_every_exported_metric_in_one_table() -> None:
    exported, documented = exported_metrics(), documented_metrics()
    missing = sorted(set(exported) - set(documented))
    assert not missing, f"add these to the README's metrics table: {missing}"
    gone = sorted(set(documented) - set(exported))
    assert not gone, f"the README documents metrics nothing exports: {gone}"
    wrong = {n: (documented[n], t) for n, t in exported.items() if documented[n] != t}
    assert not wrong, f"README type differs from the code (documented, exported): {wrong}"


def test_dashboards_and_rules_read_only_exported_series() -> None:
    exported = set(exported_metrics())
    series = exported | {
        f"{name}{suffix}"
        for name, kind in exported_metrics().items()
        if kind == "histogram"
        for suffix in ("_bucket", "_sum", "_count")
    }
    rules = rule_queries(REPO / RULES)
    recorded = {q.record for q in rules if q.kind == "record"}
    queries = rules + [
        q for path in sorted((REPO / DASHBOARDS).glob("*.json")) for q in dashboard_queries(path)
    ]
    unknown = {q.source: sorted(metric_names(q.expr) - series - recorded) for q in queries}
    unknown = {source: names for source, names in unknown.items() if names}
    assert not unknown, f"queries read series that no code exports: {unknown}"
    # Recording rules follow level:metric:operations.
    for name in recorded:
        assert re.fullmatch(r"ampacity:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_sync_writes_and_checks(tmp_path: Path) -> None:
    from ampacity.cli import main

    (tmp_path / "dashboards").mkdir()
    (tmp_path / "rules").mkdir()
    (tmp_path / "dashboards" / "a.json").write_text("{}\n")
    (tmp_path / "rules" / "ampacity.rules.yaml").write_text("groups: []\n")
    orphan = tmp_path / "helm/ampacity/files/dashboards/old.json"
    orphan.parent.mkdir(parents=True)
    orphan.write_text("{}\n")
    assert main(["observability", "sync", "--check", "--root", str(tmp_path)]) == 1
    assert main(["observability", "sync", "--root", str(tmp_path)]) == 0
    assert (tmp_path / "helm/ampacity/files/dashboards/a.json").read_text() == "{}\n"
    assert not orphan.exists()
    assert main(["observability", "sync", "--check", "--root", str(tmp_path)]) == 0
