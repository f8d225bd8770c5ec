"""Loading with resharding: any world size reads a checkpoint saved at any other.

Each parameter's target region (the rank's even shard along the saved split axis, or
an explicit ShardSpec) is assembled from the fragments that overlap it, read through a
memory map so a rank reads only the bytes it needs (the ByteCheckpoint / Universal
Checkpointing approach of resharding at load time rather than at save time).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ampacity.training.sdk.layout import (
    MANIFEST,
    ParamEntry,
    ShardSpec,
    even_shard,
    is_complete,
    latest_complete,
    read_manifest,
)
from ampacity.training.sdk.tensors import from_numpy


class TornCheckpointError(RuntimeError):
    """The checkpoint has no committed manifest (or lost fragments): never resume from it."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    path: Path
    saved_world_size: int
    state: dict[str, Any]  # numpy arrays, or torch tensors with as_torch=True
    extra: dict[str, Any]


def resolve_checkpoint(path: Path) -> Path:
    """A step directory as given, or the latest complete checkpoint under a root."""
    if (path / MANIFEST).exists() or path.name.startswith("step-"):
        if not is_complete(path):
            raise TornCheckpointError(f"{path} has no committed manifest or is missing fragments")
        return path
    latest = latest_complete(path)
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint under {path}")
    return latest


def target_spec(entry: ParamEntry, world_size: int, rank: int) -> ShardSpec:
    """Where rank `rank` of `world_size` takes its part: split as it was saved, evenly."""
    shape = tuple(entry.global_shape)
    if entry.shard_axis is None:
        return ShardSpec(shape, (0,) * len(shape), shape, None)
    return even_shard(shape, world_size, rank, entry.shard_axis)


def read_region(checkpoint: Path, entry: ParamEntry, spec: ShardSpec) -> np.ndarray:
    """Assemble the box `spec` of a parameter from the fragments overlapping it."""
    out = np.empty(spec.shape, dtype=np.dtype(entry.dtype))
    filled = 0
    for fragment in entry.fragments:
        lo = [max(a, b) for a, b in zip(spec.offsets, fragment.offsets, strict=True)]
        hi = [
            min(a + n, b + m)
            for a, n, b, m in zip(spec.offsets, spec.shape, fragment.offsets, fragment.shape, strict=True)
        ]
        if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
            continue
        source = np.load(checkpoint / fragment.file, mmap_mode="r", allow_pickle=False)
        src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, fragment.offsets, strict=True))
        dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, spec.offsets, strict=True))
        out[dst] = source[src]
        filled += int(np.prod([b - a for a, b in zip(lo, hi, strict=True)]))
    if filled != out.size:
        raise TornCheckpointError(f"{checkpoint}: fragments cover {filled} of {out.size} elements")
    return out


def load_checkpoint(
    path: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    shards: Mapping[str, ShardSpec] | None = None,
    as_torch: bool = False,
) -> LoadedCheckpoint:
    """Load rank `rank`'s part of a checkpoint for a job now running at `world_size`.

    `path` is a step directory or a checkpoint root (then the latest complete one is
    used). Parameters split at save time are split again evenly along the same axis for
    the new world size unless `shards` gives a region; replicated ones load whole.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    checkpoint = resolve_checkpoint(Path(path))
    manifest = read_manifest(checkpoint)
    shards = shards or {}
    state: dict[str, Any] = {}
    for name, entry in manifest.params.items():
        spec = shards.get(name) or target_spec(entry, world_size, rank)
        if list(spec.global_shape) != entry.global_shape:
            raise ValueError(f"{name}: global shape {entry.global_shape} != requested {spec.global_shape}")
        state[name] = from_numpy(read_region(checkpoint, entry, spec), entry.torch_dtype, as_torch=as_torch)
    return LoadedCheckpoint(manifest.step, checkpoint, manifest.world_size, state, manifest.extra)
