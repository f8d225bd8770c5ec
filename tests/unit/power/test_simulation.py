"""The row evaluation: small rows, short windows, deterministic."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ampacity.data import data_dir
from ampacity.power import cli
from ampacity.power.eval.plot import plot_row_power
from ampacity.power.eval.simulation import (
    Criteria,
    RowConfig,
    Trace,
    compare,
    fit_servers,
    load_azure_conv,
    row_budget,
)

pytestmark = pytest.mark.skipif(
    not (data_dir() / "azure-llm-2023").exists(), reason="public traces not present (set AMPACITY_DATA)"
)

NAMEPLATE = 8 * 700.0


@pytest.fixture(scope="module")
def trace() -> Trace:
    return load_azure_conv()


def small(servers: int, limit_servers: float = 4, **kwargs: object) -> RowConfig:
    config = RowConfig(
        budget=row_budget(limit_servers * NAMEPLATE), servers=servers, duration_s=120.0, warmup_s=20.0
    )
    return replace(config, **kwargs)  # type: ignore[arg-type]


def test_trace_is_the_azure_conversation_trace(trace: Trace) -> None:
    assert trace.arrival_s.size == 19_366
    assert np.all(np.diff(trace.arrival_s) >= 0)
    assert 3_400 < trace.span_s < 3_600


def test_same_seed_same_run_and_other_seed_other_run(trace: Trace) -> None:
    a = compare(small(5), trace)
    b = compare(small(5), trace)
    c = compare(small(5, seed=1), trace)
    assert np.array_equal(a.capped.row_watts, b.capped.row_watts)
    assert np.array_equal(a.capped.latency_s, b.capped.latency_s)
    assert not np.array_equal(a.capped.row_watts, c.capped.row_watts)


def test_policy_keeps_an_oversubscribed_row_under_the_limit(trace: Trace) -> None:
    result = compare(small(5, training_fraction=0.5), trace)
    limit = result.capped.config.budget.limit_watts
    assert result.uncapped.peak_watts > limit  # 5 servers do not fit in 4 servers' power...
    assert result.capped.overruns == (0, 0.0)  # ...but the policy keeps them under it
    assert result.training_throughput_loss > 0  # paid for by training
    assert result.capped.cap_changes > 0


def test_at_nameplate_the_row_never_exceeds_the_limit_even_uncapped(trace: Trace) -> None:
    result = compare(small(4), trace)
    assert result.uncapped.peak_watts <= result.uncapped.config.budget.limit_watts


def test_uncapped_row_costs_nothing(trace: Trace) -> None:
    result = compare(small(3, limit_servers=10), trace)
    assert result.p99_latency_increase == 0.0
    assert result.training_throughput_loss == 0.0
    assert result.capped.cap_changes == 0


def test_fit_finds_more_servers_than_nameplate_when_training_may_slow_down(trace: Trace) -> None:
    config = small(1, training_fraction=0.5)
    result = fit_servers(
        config, Criteria(max_p99_latency_increase=0.05, max_training_throughput_loss=0.5), trace
    )
    assert result.nameplate_servers == 4
    assert result.policy_servers > result.nameplate_servers
    assert result.best.capped.overruns == (0, 0.0)
    tried = dict(result.tried)
    assert tried[result.policy_servers] is True
    assert tried.get(result.policy_servers + 1) is not True


def test_plot_and_cli_write_their_outputs(tmp_path: Path, trace: Trace) -> None:
    png = plot_row_power(compare(small(5), trace), tmp_path / "row.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(
        ["power", "sim", "--servers", "5", "--limit-kw", "22.4", "--duration", "60", "--out", str(out)]
    )
    assert args.func(args) == 0
    [summary] = json.loads((out / "power_sim.json").read_text())
    assert summary["servers"] == 5 and summary["overruns"] == 0
    assert (out / "power_sim_5.png").exists()
