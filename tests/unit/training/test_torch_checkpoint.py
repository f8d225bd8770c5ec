"""The PyTorch SDK for real: torchrun processes on gloo, DCP checkpoints to a local S3 server (moto).

Each "pod" is a local torchrun with exactly the environment the controller writes
(`rendezvous_env`, the same function), so these tests also show that a bare `torchrun
train.py` and the explicit `torchrun --nnodes=$PET_NNODES ...` form one group across pods.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ampacity.training.rendezvous import rendezvous_env
from ampacity.training.retention import RetentionPolicy
from ampacity.training.sdk.storage import CheckpointStore, Manifest
from ampacity.training.sdk.torch_checkpoint import Checkpointer, TrainState
from tests.unit.training.conftest import S3
from tests.unit.training.reshard_worker import STEP, full_state

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "train.py"
RESHARD_WORKER = Path(__file__).with_name("reshard_worker.py")
#: Generous: two cores shared with other work; a healthy run takes well under a minute.
DEADLINE_SECONDS = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMPACITY_", "PET_", "TORCHELASTIC_"))}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    # Loopback only, one thread per process: two cores run all of it.
    return env | {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)} | extra


class Pod:
    """One worker pod: a torchrun process group whose JSON output lines are collected."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.lines: list[dict[str, Any]] = []
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                self.lines.append(json.loads(line))

    def wait_for(self, what: str, predicate: Any) -> dict[str, Any]:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if predicate(line):
                    return line
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no {what} (exit {self.process.poll()}); see {self._log.name}")

    def exit_code(self) -> int:
        code = self.process.wait(timeout=DEADLINE_SECONDS)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        """What deleting the pod does: every process in it ends."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)
        self._reader.join(timeout=10)
        self._log.close()

    def losses(self) -> dict[int, float]:
        return {line["step"]: line["loss"] for line in self.lines if "step" in line}


def start_gang(
    *, world: int, attempt: int, uri: str, s3: S3, args: list[str], explicit: bool, logs: Path
) -> list[Pod]:
    port = free_port()
    pods = []
    for rank in range(world):
        env = rendezvous_env(
            rank=rank, world_size=world, gpus_per_worker=0, master_addr="127.0.0.1", master_port=port
        )
        flags = (
            [
                f"--nnodes={env['PET_NNODES']}",
                f"--nproc-per-node={env['PET_NPROC_PER_NODE']}",
                f"--node-rank={env['PET_NODE_RANK']}",
                f"--master-addr={env['PET_MASTER_ADDR']}",
                f"--master-port={env['PET_MASTER_PORT']}",
            ]
            if explicit
            else []
        )
        job_env = {
            **env,
            **s3.env(),
            "AMPACITY_CHECKPOINT_URI": uri,
            "AMPACITY_ATTEMPT": str(attempt),
            "AMPACITY_RETENTION_KEEP_LAST": "2",
        }
        pods.append(
            Pod([*flags, str(EXAMPLE), *args], base_env(job_env), logs / f"gang{attempt}-pod{rank}.log")
        )
    return pods


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def test_a_killed_rank_restarts_the_gang_from_the_latest_committed_checkpoint(s3: S3, logs: Path) -> None:
    uri = f"s3://{s3.bucket}/restart"
    store = CheckpointStore(uri, {"endpoint_url": s3.endpoint})
    # Gang 0: a bare `torchrun train.py` in each pod, training until a rank is killed.
    gang = start_gang(
        world=2,
        attempt=0,
        uri=uri,
        s3=s3,
        args=["--steps", "100000", "--checkpoint-every", "5"],
        explicit=False,
        logs=logs,
    )
    try:
        started = [pod.wait_for("start line", lambda line: "pid" in line) for pod in gang]
        assert [line["resumed_from"] for line in started] == [None, None]
        gang[0].wait_for("a committed checkpoint", lambda line: line.get("committed", 0) >= 10)
        committed_seen = max(line["committed"] for line in gang[0].lines if "committed" in line)
        gang[0].wait_for("steps past it", lambda line: line.get("step", 0) >= committed_seen + 2)
        os.kill(started[1]["pid"], signal.SIGKILL)  # rank 1's trainer dies
        assert gang[1].exit_code() != 0  # its torchrun gives up: the gang is broken
    finally:
        for pod in gang:
            pod.kill()  # the operator deletes the whole gang
    before = gang[0].losses()
    latest = store.latest_committed()
    assert latest is not None and latest.step >= 10
    assert store.read_manifest(latest.step).attempt == 0
    # Gang 1: the explicit torchrun form, resuming; it runs a few steps past where gang 0 got.
    last = max(before)
    gang = start_gang(
        world=2,
        attempt=1,
        uri=uri,
        s3=s3,
        args=["--steps", str(last + 4), "--checkpoint-every", "5"],
        explicit=True,
        logs=logs,
    )
    try:
        assert [pod.exit_code() for pod in gang] == [0, 0]
    finally:
        for pod in gang:
            pod.kill()
    after = gang[0].losses()
    assert [line["resumed_from"] for line in gang[0].lines if "pid" in line] == [latest.step]
    assert min(after) == latest.step + 1
    assert max(after) == last + 3
    # The same model, optimizer state and data: the curve continues exactly where it left off.
    replayed = sorted(set(before) & set(after))
    assert replayed == list(range(latest.step + 1, last + 1))
    for step in replayed:
        assert after[step] == pytest.approx(before[step], rel=1e-6, abs=1e-7), step
    # Retention (keepLast 2) ran on the object store; the newest commit is gang 1's.
    kept = [c.step for c in store.checkpoints() if c.committed]
    assert len(kept) == 2 and store.read_manifest(kept[-1]).attempt == 1
    assert kept[-1] == max(s for s in range(last + 4) if s % 5 == 0)


def run_reshard(mode: str, world: int, uri: str, s3: S3, logs: Path) -> list[dict[str, Any]]:
    env = base_env({**s3.env(), "AMPACITY_ATTEMPT": "0"})
    out = logs / f"{mode}-{world}"
    out.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world}",
            str(RESHARD_WORKER),
            mode,
            uri,
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE_SECONDS,
        check=False,
    )
    (logs / f"{mode}-{world}.log").write_text(result.stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(path.read_text()) for path in sorted(out.glob("rank-*.json"))]


def test_a_four_rank_checkpoint_loads_into_two_and_eight_ranks(s3: S3, logs: Path) -> None:
    uri = f"s3://{s3.bucket}/reshard"
    assert len(run_reshard("save", 4, uri, s3, logs)) == 4
    manifest = CheckpointStore(uri, {"endpoint_url": s3.endpoint}).read_manifest(STEP)
    assert (manifest.world_size, manifest.extra) == (4, {"data_position": 1234})
    full = full_state()
    for world in (2, 8):
        ranks = run_reshard("load", world, uri, s3, logs)
        assert sorted(r["rank"] for r in ranks) == list(range(world))
        for r in ranks:
            assert (r["step"], r["saved_world_size"], r["count"]) == (STEP, 4, 7)
            assert r["extra"] == {"data_position": 1234}
            assert torch.equal(torch.tensor(r["w"]), full["w"])
            assert torch.equal(torch.tensor(r["b"]), full["b"])
            assert torch.equal(torch.tensor(r["exp_avg"]), full["exp_avg"])
            assert r["local_w_rows"] == 24 // world


def test_a_checkpoint_without_its_manifest_is_torn_and_retention_keeps_the_latest(tmp_path: Path) -> None:
    """One process, `file://`: a save counts only once its manifest is in; the torn one is skipped."""
    uri = f"file://{tmp_path}"
    state = {"w": torch.arange(6.0)}
    with Checkpointer(uri, storage_options={}, attempt=0, retention=RetentionPolicy(keep_last=1)) as ckpt:
        for step in (1, 2, 3):
            state["w"] += 1
            ckpt.save(step, state)
        result = ckpt.wait()
    assert result is not None and result.committed and result.size_bytes > 0
    store = CheckpointStore(uri)
    assert [(c.step, c.committed) for c in store.checkpoints()] == [(3, True)]
    # A later save torn by a crash: its DCP files are there, its manifest is not.
    with Checkpointer(uri, storage_options={}, attempt=1) as ckpt:
        ckpt.save(4, {"w": torch.zeros(6)})
    (tmp_path / "step-000000000004" / "manifest.json").unlink()
    assert [(c.step, c.committed) for c in store.checkpoints()] == [(3, True), (4, False)]
    loaded = {"w": torch.zeros(6)}
    with Checkpointer(uri, storage_options={}) as ckpt:
        restored = ckpt.load_latest(loaded)
        assert restored is not None and restored.step == 3
        with pytest.raises(ValueError, match="not after the last checkpoint"):
            ckpt.save(3, loaded)
    assert torch.equal(loaded["w"], torch.arange(6.0) + 3)
    assert Manifest.from_json(store.read_manifest(3).to_json()) == store.read_manifest(3)


def test_a_plain_python_trainer_joins_the_gang_through_world_size_and_rank(tmp_path: Path) -> None:
    """No torchrun: one process per pod, `init_process_group` reads WORLD_SIZE/RANK/MASTER_* itself."""
    port = free_port()
    pods = []
    for rank in range(2):
        env = rendezvous_env(
            rank=rank, world_size=2, gpus_per_worker=0, master_addr="127.0.0.1", master_port=port
        )
        job_env = base_env(
            {**env, "AMPACITY_CHECKPOINT_URI": f"file://{tmp_path / 'ckpt'}", "AMPACITY_ATTEMPT": "0"}
        )
        pods.append(
            subprocess.Popen(
                [sys.executable, str(EXAMPLE), "--steps", "3", "--checkpoint-every", "2"],
                env=job_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=DEADLINE_SECONDS) for p in pods]
    assert [p.returncode for p in pods] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    lines = [json.loads(line) for line in outputs[0][0].splitlines() if line.startswith("{")]
    assert [line["step"] for line in lines if "step" in line] == [0, 1, 2]
    assert {line["committed"] for line in lines if "committed" in line} == {0, 2}
    assert [c.step for c in CheckpointStore(f"file://{tmp_path / 'ckpt'}").checkpoints() if c.committed] == [
        0,
        2,
    ]


def test_an_overlapped_save_holds_the_optimizer_step_until_its_copy_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`overlap_staging`: save returns while DCP's copy runs; the next `optimizer.step()` waits for it,
    so the checkpoint holds the state at `save`, and that wait counts as stall."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    state = TrainState(model, optimizer)
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    copy_may_run = threading.Event()
    with Checkpointer(f"file://{tmp_path}", storage_options={}, attempt=0, overlap_staging=True) as ckpt:
        assert ckpt._overlap_stager is not None
        stager = ckpt._overlap_stager._state_dict_stager
        real_stage = stager.stage

        def held_stage(*args: Any, **kwargs: Any) -> Any:
            copy_may_run.wait(timeout=DEADLINE_SECONDS)
            return real_stage(*args, **kwargs)

        monkeypatch.setattr(stager, "stage", held_stage)
        call_stall = ckpt.save(1, state)
        # Training goes on while the copy waits: forward and backward do not write the parameters...
        model(torch.randn(2, 8)).sum().backward()
        # ...and the optimizer step waits for the copy.
        stepper = threading.Thread(target=optimizer.step)
        stepper.start()
        stepper.join(timeout=0.5)
        assert stepper.is_alive(), "optimizer.step() ran while the checkpoint's copy was still pending"
        copy_may_run.set()
        stepper.join(timeout=DEADLINE_SECONDS)
        result = ckpt.wait()
    assert result is not None and result.committed
    assert call_stall < 0.5 <= result.stall_seconds
    assert not torch.equal(model.weight, at_save["weight"])  # the step did run afterwards
    fresh = torch.nn.Linear(8, 4)
    with Checkpointer(f"file://{tmp_path}", storage_options={}) as ckpt:
        restored = ckpt.load_latest(TrainState(fresh, torch.optim.Adam(fresh.parameters(), lr=0.1)))
    assert restored is not None and restored.step == 1
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, at_save[key]), key
