"""Save-stall benchmark: the asynchronous two-phase save against a synchronous save.

Both write the same state (float32 arrays totalling `size_gb`) through the same code
path (fragments, fsync, manifest commit). The stall is the time `save` blocks the
caller: the whole write for the synchronous save, the host-memory snapshot for the
asynchronous one. The host buffers are reserved before the first save, as a trainer
does at startup, so every asynchronous save is a plain copy.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ampacity.training.sdk.layout import delete_checkpoint
from ampacity.training.sdk.save import AsyncCheckpointer, save_checkpoint


@dataclass(frozen=True)
class StallBenchmark:
    size_bytes: int
    arrays: int
    sync_stall_seconds: list[float]
    async_stall_seconds: list[float]
    async_persist_seconds: list[float]

    @property
    def sync_median(self) -> float:
        return statistics.median(self.sync_stall_seconds)

    @property
    def async_median(self) -> float:
        return statistics.median(self.async_stall_seconds)

    @property
    def ratio(self) -> float:
        """How many times shorter the asynchronous stall is than the synchronous one (medians)."""
        return self.sync_median / self.async_median


def bench_checkpoint_stall(
    directory: Path, *, size_gb: float = 2.0, arrays: int = 16, repeats: int = 3, seed: int = 0
) -> StallBenchmark:
    """Alternate synchronous and asynchronous saves of one state into `directory`."""
    if repeats < 1 or arrays < 1:
        raise ValueError("need at least one repeat and one array")
    per_array = int(size_gb * 2**30) // (4 * arrays)
    rng = np.random.default_rng(seed)
    state = {f"layer{i:03d}.weight": rng.random(per_array, dtype=np.float32) for i in range(arrays)}
    sync_stalls: list[float] = []
    async_stalls: list[float] = []
    persists: list[float] = []
    with AsyncCheckpointer(directory / "async") as checkpointer:
        checkpointer.reserve(state)
        for step in range(repeats):
            result = save_checkpoint(directory / "sync", step, state)
            sync_stalls.append(result.stall_seconds)
            delete_checkpoint(Path(result.path))
            async_stalls.append(checkpointer.save(step, state))
            # Training would go on here and change the state while the persist runs.
            state["layer000.weight"] += 1.0
            done = checkpointer.wait()
            if done is None:
                raise RuntimeError("the asynchronous save left no result")
            persists.append(done.persist_seconds)
            delete_checkpoint(Path(done.path))
    return StallBenchmark(
        size_bytes=sum(a.nbytes for a in state.values()),
        arrays=arrays,
        sync_stall_seconds=sync_stalls,
        async_stall_seconds=async_stalls,
        async_persist_seconds=persists,
    )
