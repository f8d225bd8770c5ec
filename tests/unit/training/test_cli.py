import argparse
import json
from pathlib import Path

import pytest

from ampacity.training.cli import register


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ampacity")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def test_interval_prints_the_interval_and_its_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["training", "interval", "--nodes", "256", "--stall", "10", "--persist", "4000"]) == 0
    seconds, reason = capsys.readouterr().out.strip().splitlines()
    assert seconds == "4000 s"
    assert reason.startswith("auto:") and "persist" in reason


def test_sim_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["training", "sim", "--nodes", "32", "--trials", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["policies"]) == {"fixed", "oracle", "auto"}
    assert out["policies"]["oracle"]["ratio_to_oracle"] == 1.0


def test_bench_checkpoint_tiny(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["training", "bench-checkpoint", "--size-gb", "0.002", "--arrays", "4", "--repeats", "2"]
    assert run([*argv, "--dir", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["size_bytes"] == 4 * (int(0.002 * 2**30) // 16) * 4
    assert len(out["sync_stall_seconds"]) == len(out["async_stall_seconds"]) == 2
    assert list(tmp_path.iterdir()) == []  # the benchmark cleans up after itself
