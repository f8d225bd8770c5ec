"""The on-disk checkpoint layout: one directory per step, fragments per parameter, manifest last.

    <root>/step-000000001200/
        params/<name>-<hash>/rank-00003.a0002.npy   one fragment: the part of a parameter a rank held
        rank-00003.a0002.json                       what that rank wrote (written atomically)
        manifest.json                               committed last, atomically: the checkpoint exists

`a0002` is the attempt: how many times the gang was restarted. A crash can leave a torn
step directory that the restarted gang reaches and saves again; naming files by attempt
means the new save never overwrites files of the old one, and the manifest only ever
merges the indexes of a single attempt.

The layout is "universal" in the sense of Universal Checkpointing (Lian et al., 2024) and
ByteCheckpoint (Wan et al., NSDI 2025): every fragment records the global shape of its
parameter and its offsets in it, so a loader at any world size can cut the region it
needs out of the fragments, whatever the world size at save time.

A checkpoint is complete only once `manifest.json` exists; it is written to a temporary
file, fsynced and renamed over (atomic on POSIX), after every fragment and rank index is
fsynced. A directory without it is torn (a crash mid-save) and is never resumed from.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from ampacity.training.retention import CheckpointRecord, RetentionPolicy, plan_retention

FORMAT = "ampacity-universal-checkpoint/1"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{12})$")


@dataclass(frozen=True)
class ShardSpec:
    """The part of a parameter one rank holds: a box of `shape` at `offsets` in `global_shape`.

    `axis` is the axis the parameter is split along, so a loader at another world size
    can split it the same way; None means replicated (saved once, by rank 0).
    """

    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    axis: int | None

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offsets, self.shape, strict=True))


def even_shard(global_shape: tuple[int, ...], world_size: int, rank: int, axis: int = 0) -> ShardSpec:
    """Rank `rank` of `world_size`'s contiguous slice along `axis`, sized like np.array_split."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    length = global_shape[axis]
    base, extra = divmod(length, world_size)
    start = rank * base + min(rank, extra)
    size = base + (1 if rank < extra else 0)
    offsets = tuple(start if i == axis else 0 for i in range(len(global_shape)))
    shape = tuple(size if i == axis else n for i, n in enumerate(global_shape))
    return ShardSpec(tuple(global_shape), offsets, shape, axis)


def shard_array(full: np.ndarray, world_size: int, rank: int, axis: int = 0) -> tuple[np.ndarray, ShardSpec]:
    """Cut rank `rank`'s even shard out of a full array (for tests and single-process demos)."""
    spec = even_shard(full.shape, world_size, rank, axis)
    return full[spec.slices()], spec


class Fragment(BaseModel):
    file: str  # relative to the step directory
    offsets: list[int]
    shape: list[int]
    file_bytes: int


class ParamEntry(BaseModel):
    global_shape: list[int]
    dtype: str  # numpy dtype string of the stored bytes
    torch_dtype: str | None = None
    shard_axis: int | None
    fragments: list[Fragment]


class RankIndex(BaseModel):
    format: str = FORMAT
    step: int
    rank: int
    world_size: int
    attempt: int
    params: dict[str, ParamEntry]
    extra: dict[str, Any]
    stall_seconds: float
    persist_seconds: float


class Manifest(BaseModel):
    """The committed description of a complete checkpoint."""

    format: str = FORMAT
    step: int
    world_size: int
    attempt: int
    created_at: float
    params: dict[str, ParamEntry]
    extra: dict[str, Any]
    total_bytes: int
    stall_seconds: float  # the slowest rank's
    persist_seconds: float  # the slowest rank's


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:012d}"


def fragment_file(name: str, rank: int, attempt: int) -> str:
    """A fragment's path in the step directory: readable, and unique even for odd names."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80]
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"params/{safe}-{digest}/rank-{rank:05d}.a{attempt:04d}.npy"


def rank_index_file(rank: int, attempt: int) -> str:
    return f"rank-{rank:05d}.a{attempt:04d}.json"


def attempt_from_env() -> int:
    """The gang's restart count, set by the controller as AMPACITY_ATTEMPT (0 outside a TrainingJob)."""
    return int(os.environ.get("AMPACITY_ATTEMPT", "0"))


def retention_from_env() -> RetentionPolicy | None:
    """The job's retention, set by the controller as AMPACITY_RETENTION_KEEP_LAST / _KEEP_EVERY."""
    keep_last = os.environ.get("AMPACITY_RETENTION_KEEP_LAST")
    if not keep_last:
        return None
    return RetentionPolicy(int(keep_last), int(os.environ.get("AMPACITY_RETENTION_KEEP_EVERY", "0")))


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write-temp, fsync, rename, fsync the directory: readers see all of it or none of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def read_manifest(checkpoint: Path) -> Manifest:
    """The manifest of a complete checkpoint; FileNotFoundError if it is torn."""
    return Manifest.model_validate_json((checkpoint / MANIFEST).read_text())


def is_complete(checkpoint: Path) -> bool:
    """Committed manifest, right format, and every fragment present at its recorded size."""
    try:
        manifest = read_manifest(checkpoint)
    except (OSError, ValueError):
        return False
    if manifest.format != FORMAT:
        return False
    for entry in manifest.params.values():
        for fragment in entry.fragments:
            path = checkpoint / fragment.file
            if not path.is_file() or path.stat().st_size != fragment.file_bytes:
                return False
    return True


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    complete: bool
    time: float  # directory modification time

    def record(self) -> CheckpointRecord:
        return CheckpointRecord(self.step, self.complete, self.time)


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Every step directory under `root`, ascending, with whether it is complete."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append(CheckpointInfo(int(match[1]), child, is_complete(child), child.stat().st_mtime))
    return sorted(found, key=lambda c: c.step)


def latest_complete(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (torn ones are skipped), or None."""
    complete = [c for c in list_checkpoints(root) if c.complete]
    return complete[-1].path if complete else None


def delete_checkpoint(checkpoint: Path) -> None:
    """Remove the manifest first, so a half-deleted checkpoint reads as torn, never as complete."""
    (checkpoint / MANIFEST).unlink(missing_ok=True)
    fsync_dir(checkpoint)
    shutil.rmtree(checkpoint)


def apply_retention(root: Path, policy: RetentionPolicy) -> list[int]:
    """Delete what `plan_retention` says may go; returns the deleted steps."""
    checkpoints = {c.step: c for c in list_checkpoints(root)}
    plan = plan_retention([c.record() for c in checkpoints.values()], policy)
    for step in plan.delete:
        delete_checkpoint(checkpoints[step].path)
    return list(plan.delete)
