"""The control-plane build's heartbeat, with a fake slow command in place of `go build`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

HEARTBEAT = Path(__file__).resolve().parents[2] / "tools" / "controlplane" / "heartbeat.sh"


def run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source {HEARTBEAT}; {script}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "AMPACITY_HEARTBEAT_SECONDS": "1"},
    )


def test_a_slow_build_prints_the_component_and_the_elapsed_time() -> None:
    result = run("timed kube-apiserver sleep 3.5")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    beats = [
        int(m.group(1)) for line in lines if (m := re.search(r"still building kube-apiserver: (\d+) s", line))
    ]
    assert len(beats) >= 2 and beats == sorted(beats), lines
    assert re.fullmatch(r"\[controlplane\]   kube-apiserver done in [34] s", lines[-1]), lines


def test_a_failed_build_says_so_keeps_its_exit_status_and_stops_the_heartbeat() -> None:
    result = run("timed etcd bash -c 'sleep 1.5; exit 3' || echo \"exit $?\"; sleep 2.5")
    assert result.stdout.strip() == "exit 3"
    lines = result.stderr.splitlines()
    failed = next(i for i, line in enumerate(lines) if "building etcd failed after" in line)
    assert "(exit 3)" in lines[failed]
    assert not any("still building" in line for line in lines[failed + 1 :]), lines


def test_a_quick_build_prints_no_heartbeat() -> None:
    result = run("timed helm true")
    assert result.stderr.splitlines() == ["[controlplane]   helm done in 0 s"]
