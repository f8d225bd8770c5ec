"""PyTorch save stall and persist throughput: the SDK's DCP async save against a synchronous torch.save.

Stall: the same state (float32 tensors totalling `size_gb`) saved alternately with
`torch.save` to a local file, flushed and fsynced (what a synchronous checkpoint must do
to be durable), and with `Checkpointer.save` (DCP `async_save`, staged into host memory by
a reused stager). The stall is how long each call blocks the caller; the first
asynchronous save, which allocates the staging buffers as a trainer's first checkpoint
does, is a warm-up and not counted.

Persist: the background part of the same asynchronous saves, from the end of the stall
to the committed manifest, to a local directory and to an S3-compatible store (bytes
written / seconds).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ampacity.training.sdk.storage import CheckpointStore
from ampacity.training.sdk.torch_checkpoint import Checkpointer


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
