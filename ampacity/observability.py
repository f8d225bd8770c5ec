"""`ampacity observability`: keep the Helm chart's copies of the dashboards and rules in step.

The sources are `dashboards/*.json` (Grafana dashboards) and `rules/ampacity.rules.yaml`
(Prometheus recording rules and alerts). A chart reads only its own files, so
`ampacity observability sync` copies them under `helm/ampacity/files/`, where
`templates/dashboards.yaml` and `templates/prometheusrule.yaml` pick them up; `--check`
fails when a copy has drifted (as `ampacity crds generate --check` does for the CRDs).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

#: Where the dashboards and the rules live, relative to the repository root.
DASHBOARDS = Path("dashboards")
RULES = Path("rules/ampacity.rules.yaml")
RULES_TEST = Path("rules/ampacity.rules.test.yaml")
#: (source folder, file pattern, the chart's copy), relative to the repository root.
COPIES = (
    (DASHBOARDS, "*.json", Path("helm/ampacity/files/dashboards")),
    (RULES.parent, RULES.name, Path("helm/ampacity/files/rules")),
)


def planned(root: Path) -> tuple[dict[Path, Path], list[Path]]:
    """The copies to make (target -> source) and the stale targets that have no source any more."""
    copies: dict[Path, Path] = {}
    extra: list[Path] = []
    for source_dir, pattern, target_dir in COPIES:
        sources = sorted((root / source_dir).glob(pattern))
        wanted = {target_dir / s.name: s for s in sources}
        copies |= {root / target: source for target, source in wanted.items()}
        extra += [t for t in sorted((root / target_dir).glob(pattern)) if t.relative_to(root) not in wanted]
    return copies, extra


def stale_files(root: Path) -> list[Path]:
    """Chart copies that are missing, differ from their source, or have no source."""
    copies, extra = planned(root)
    differ = [t for t, s in copies.items() if not t.exists() or t.read_bytes() != s.read_bytes()]
    return differ + extra


def sync(root: Path) -> list[Path]:
    """Write the chart's copies (and remove orphans); returns the paths written or removed."""
    copies, extra = planned(root)
    changed = []
    for target, source in copies.items():
        if not target.exists() or target.read_bytes() != source.read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            changed.append(target)
    for orphan in extra:
        orphan.unlink()
        changed.append(orphan)
    return changed


# --- the queries in dashboards and rules, for the tests that run them against Prometheus ---------


@dataclass(frozen=True)
class Query:
    """One PromQL expression: a panel target, a template variable or a rule."""

    source: str  # e.g. "power.json: GPU power [A]" or "rules: alert AmpacityPowerBudgetAboveT2"
    expr: str
    kind: str = "panel"  # panel, variable, record or alert
    record: str = ""  # the series a recording rule writes


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels inside collapsed rows


def dashboard_queries(path: Path) -> list[Query]:
    """Every panel target's expression, and every query variable's (as `label_values(...)`)."""
    model = json.loads(path.read_text())
    queries = [
        Query(f"{path.name}: {panel.get('title', '')} [{target.get('refId', '')}]", target["expr"])
        for panel in _panels(model.get("panels", []))
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in model.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else str(query)
            queries.append(Query(f"{path.name}: variable {variable['name']}", text, "variable"))
    return queries


def rule_queries(path: Path) -> list[Query]:
    """Every recording rule's and alert's expression."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return [
        Query(
            f"{path.name}: {'alert ' + rule['alert'] if 'alert' in rule else 'record ' + rule['record']}",
            str(rule["expr"]),
            "alert" if "alert" in rule else "record",
            rule.get("record", ""),
        )
        for group in groups
        for rule in group["rules"]
    ]


#: Grafana's built-in interval variables, as a Prometheus scraping every second would see them.
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$", re.DOTALL)


def substitute(expr: str, values: Mapping[str, str] | None = None) -> str:
    """The expression Grafana would send: dashboard variables (all values: `.*`) and intervals filled in.

    A `label_values(metric, label)` variable query becomes the metric selector it reads.
    """
    chosen = {**GRAFANA_INTERVALS, **(values or {})}
    expr = _VARIABLE.sub(lambda m: chosen.get(m.group(1) or m.group(2), ".*"), expr)
    match = _LABEL_VALUES.match(expr)
    return match.group(1) if match else expr


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)")


def with_bool(expr: str) -> str:
    """The expression with every comparison outside label matchers turned into a `bool` one.

    An alert's expression is empty while nothing is wrong; with `bool` it returns 0 or 1 for
    every series it compares, so a live Prometheus can show that the series it needs exist.
    """
    out: list[str] = []
    depth, quote, i = 0, "", 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                out.append(expr[i : i + 2])
                i += 2
                continue
            if char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif depth == 0 and (match := _COMPARISON.match(expr, i)):
            out.append(f"{match.group(1)} bool")
            i = match.end()
            continue
        out.append(char)
        i += 1
    return "".join(out)


#: Metric and recording-rule names in an expression.
_NAME = re.compile(r"(?<![\w:])(ampacity(?:_|:)[a-zA-Z0-9_:]*[a-zA-Z0-9_])")


def metric_names(expr: str) -> set[str]:
    """The ampacity_* metrics and ampacity:* recorded series an expression reads."""
    return set(_NAME.findall(expr))


def _sync(args: argparse.Namespace) -> int:
    root: Path = args.root
    if args.check:
        stale = stale_files(root)
        for path in stale:
            print(f"{path} is out of date; run `ampacity observability sync`", file=sys.stderr)
        return 1 if stale else 0
    for path in sync(root):
        print(f"updated {path}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser("observability", help="Grafana dashboards and Prometheus rules")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    sync_parser = actions.add_parser("sync", help="copy dashboards/ and rules/ into the Helm chart")
    sync_parser.add_argument("--root", type=Path, default=Path(), help="repository root")
    sync_parser.add_argument(
        "--check", action="store_true", help="fail if the chart's copies differ instead of writing"
    )
    sync_parser.set_defaults(func=_sync)
