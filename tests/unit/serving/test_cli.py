from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ampacity.cli import main
from ampacity.serving.cli import parse_bandwidth, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"), [("1s", 1.0), ("100ms", 0.1), ("250us", 250e-6), ("0.5", 0.5), ("2m", 120.0)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "rate"), [("400Gbps", 50e9), ("50GB/s", 50e9), ("3.2Tbps", 400e9)])
def test_parse_bandwidth(text: str, rate: float) -> None:
    assert parse_bandwidth(text) == pytest.approx(rate)


@pytest.mark.parametrize("bad", ["fast", "1 hour", "-1s"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(bad)


def test_serving_sim_prints_the_plans_and_writes_the_plot(
    traces_present: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serving", "sim", "--trace", "azure-conv", "--model", "llama2-70b", "--gpu", "h100"]
    argv += ["--ttft", "1s", "--tpot", "100ms", "--sample", "100", "--rate", "20", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "disaggregated" in out and "colocated" in out and "chosen:" in out
    assert "for 20 req/s:" in out
    plot = tmp_path / "serving-azure-conv-llama2-70b-h100.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serving_sim_fails_when_no_pool_meets_the_slo(
    traces_present: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No prefill of a conversation turn takes 5 ms on any H100 pool.
    argv = ["serving", "sim", "--ttft", "5ms", "--sample", "50", "--quiet", "--out", str(tmp_path)]
    assert main(argv) == 1
    assert "no pool meets" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
