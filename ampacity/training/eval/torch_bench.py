"""PyTorch save stall and persist throughput: the SDK's DCP async save against a synchronous torch.save.

Stall: the same state (float32 tensors totalling `size_gb`) saved alternately with
`torch.save` to a local file, flushed and fsynced (what a synchronous checkpoint must do
to be durable), and with `Checkpointer.save` (DCP `async_save`, staged into host memory by
a reused stager). The stall is how long each call blocks the caller; the first
asynchronous save, which allocates the staging buffers as a trainer's first checkpoint
does, is a warm-up and not counted.

Stall in a training loop: a model whose weights and Adam moments total `size_gb`, trained
on CPU; each repeat checkpoints once synchronously (`torch.save` + fsync of the TrainState's
state dict, between two steps) and once with `Checkpointer(overlap_staging=True)`, whose
copy runs beside the next forward and backward passes and holds only the optimizer step.
The overlapped stall is what the trainer was blocked (the save call plus the hook's wait);
the step that ran beside the copy is reported too, against the median plain step, since
on a CPU the copy competes with that step for the same cores (on a GPU node the copy is a
device-to-host DMA).

Persist: the background part of the same asynchronous saves, from the end of the stall
to the committed manifest, to a local directory and to an S3-compatible store (bytes
written / seconds).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ampacity.training.sdk.storage import CheckpointStore
from ampacity.training.sdk.torch_checkpoint import Checkpointer, TrainState


def make_state(size_gb: float, tensors: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    per_tensor = int(size_gb * 2**30) // (4 * tensors)
    return {f"layer{i:03d}.weight": torch.rand(per_tensor, generator=generator) for i in range(tensors)}


def _torch_save(state: dict[str, torch.Tensor], path: Path) -> float:
    started = time.perf_counter()
    with path.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - started


@dataclass(frozen=True)
class TorchStallBenchmark:
    size_bytes: int
    tensors: int
    sync_stall_seconds: list[float]
    async_stall_seconds: list[float]
    async_persist_seconds: list[float]

    @property
    def ratio(self) -> float:
        """How many times shorter the asynchronous stall is (medians)."""
        return statistics.median(self.sync_stall_seconds) / statistics.median(self.async_stall_seconds)


def bench_torch_stall(
    directory: Path, *, size_gb: float = 1.0, tensors: int = 16, repeats: int = 5, progress: Any = print
) -> TorchStallBenchmark:
    """Alternate `torch.save` and `Checkpointer.save` of one state in `directory`, `repeats` each."""
    if repeats < 1 or tensors < 1:
        raise ValueError("need at least one repeat and one tensor")
    state = make_state(size_gb, tensors)
    sync: list[float] = []
    stalls: list[float] = []
    persists: list[float] = []
    with Checkpointer(f"file://{directory / 'dcp'}", storage_options={}, attempt=0) as checkpointer:
        checkpointer.save(0, state)  # warm-up: allocates the staging buffers
        checkpointer.wait()
        for step in range(1, repeats + 1):
            target = directory / f"torch-save-{step}.pt"
            sync.append(_torch_save(state, target))
            target.unlink()
            stalls.append(checkpointer.save(step, state))
            # Training would go on here and change the state while the upload runs.
            state["layer000.weight"] += 1.0
            done = checkpointer.wait()
            if done is None:
                raise RuntimeError("the asynchronous save left no result")
            persists.append(done.persist_seconds)
            checkpointer.store.delete(step - 1)
            progress(
                f"save {step}/{repeats}: torch.save {sync[-1]:.3f} s, DCP async stall {stalls[-1]:.3f} s"
            )
    return TorchStallBenchmark(
        size_bytes=sum(t.numel() * t.element_size() for t in state.values()),
        tensors=tensors,
        sync_stall_seconds=sync,
        async_stall_seconds=stalls,
        async_persist_seconds=persists,
    )


#: Width of the benchmark model's square layers: 16 Mi weights each.
_WIDTH = 4096


@dataclass(frozen=True)
class TrainingLoopStallBenchmark:
    size_bytes: int  # the saved state: weights and both Adam moments
    sync_stall_seconds: list[float]
    overlapped_stall_seconds: list[float]  # blocked: the save call plus the optimizer hook's wait
    plain_step_seconds: list[float]
    overlapped_step_seconds: list[float]  # the step that ran beside the copy, its wait included

    @property
    def ratio(self) -> float:
        return statistics.median(self.sync_stall_seconds) / statistics.median(self.overlapped_stall_seconds)

    @property
    def step_slowdown_seconds(self) -> float:
        """How much longer the step beside the copy took than a plain step (medians)."""
        return statistics.median(self.overlapped_step_seconds) - statistics.median(self.plain_step_seconds)


def bench_training_loop_stall(
    directory: Path, *, size_gb: float = 1.0, repeats: int = 5, batch: int = 16, progress: Any = print
) -> TrainingLoopStallBenchmark:
    """Checkpoint a CPU training loop `repeats` times each way: synchronously, and overlapped."""
    if repeats < 1:
        raise ValueError("need at least one repeat")
    torch.manual_seed(0)
    layers = max(1, math.ceil(size_gb * 2**30 / (12 * _WIDTH * _WIDTH)))  # 4 B weight + 8 B of Adam
    model = torch.nn.Sequential(*(torch.nn.Linear(_WIDTH, _WIDTH, bias=False) for _ in range(layers)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    state = TrainState(model, optimizer)

    def step() -> float:
        started = time.perf_counter()
        loss = model(torch.randn(batch, _WIDTH)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    plain = [step() for _ in range(3)]  # the first creates Adam's moments
    sync: list[float] = []
    overlapped: list[float] = []
    beside: list[float] = []
    with Checkpointer(
        f"file://{directory / 'dcp-loop'}", storage_options={}, attempt=0, overlap_staging=True
    ) as checkpointer:
        checkpointer.save(0, state)  # warm-up: allocates the staging buffers
        step()
        checkpointer.wait()
        for n in range(1, repeats + 1):
            plain.append(step())
            target = directory / f"loop-torch-save-{n}.pt"
            sync.append(_torch_save(state.state_dict(), target))
            target.unlink()
            plain.append(step())
            call = checkpointer.save(n, state)
            beside.append(call + step())
            done = checkpointer.wait()
            if done is None or not done.committed:
                raise RuntimeError(f"the overlapped save of step {n} was not committed")
            overlapped.append(done.stall_seconds)
            checkpointer.store.delete(n - 1)
            progress(
                f"loop save {n}/{repeats}: torch.save {sync[-1]:.3f} s, "
                f"overlapped stall {overlapped[-1]:.3f} s "
                f"(step beside the copy {beside[-1]:.3f} s, plain {plain[-1]:.3f} s)"
            )
    size = sum(t.numel() * t.element_size() for t in model.parameters()) * 3
    return TrainingLoopStallBenchmark(size, sync, overlapped, plain[1:], beside)


@dataclass(frozen=True)
class PersistBenchmark:
    uri: str
    size_bytes: int
    persist_seconds: list[float]

    @property
    def bytes_per_second(self) -> float:
        return self.size_bytes / statistics.median(self.persist_seconds)


def bench_persist(
    uri: str, storage_options: dict[str, Any], *, size_gb: float = 0.5, tensors: int = 8, repeats: int = 3
) -> PersistBenchmark:
    """Committed asynchronous saves of one state to `uri`: how long the upload and commit take."""
    state = make_state(size_gb, tensors, seed=1)
    times: list[float] = []
    with Checkpointer(uri, storage_options=storage_options, attempt=0) as checkpointer:
        for step in range(repeats):
            checkpointer.save(step, state)
            done = checkpointer.wait()
            if done is None or not done.committed:
                raise RuntimeError(f"the save of step {step} to {uri} was not committed")
            times.append(done.persist_seconds)
        store: CheckpointStore = checkpointer.store
        for step in range(repeats):
            store.delete(step)
    return PersistBenchmark(uri, sum(t.numel() * t.element_size() for t in state.values()), times)
