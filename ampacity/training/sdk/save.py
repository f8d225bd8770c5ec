"""Saving: a synchronous save, and the asynchronous two-phase save that hides the persist.

Two-phase save (CheckFreq, Mohan et al., FAST 2021; DataStates-LLM, Maurya et al.,
HPDC 2024): phase one copies the state into host buffers, the only part training waits
for; phase two writes the fragments from those buffers in a background thread, fsyncs
them, writes this rank's index, and commits the manifest once every rank's index is in.
The host buffers are allocated once and reused, so later snapshots are a plain memcpy
without page faults. At most one persist is in flight: a new snapshot first waits for
the previous persist (counted as stall), which is why the interval policy never asks
for checkpoints closer than the persist time.

In a multi-rank job every rank writes its own fragments and index into the shared step
directory; the rank that finds all `world_size` indexes of its attempt present writes
the manifest.
Two ranks finishing together both write the same manifest by atomic rename, which is
harmless.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ampacity.training.retention import RetentionPolicy
from ampacity.training.sdk.layout import (
    MANIFEST,
    Fragment,
    Manifest,
    ParamEntry,
    RankIndex,
    ShardSpec,
    apply_retention,
    atomic_write_text,
    attempt_from_env,
    fragment_file,
    fsync_dir,
    rank_index_file,
    retention_from_env,
    step_dir,
)
from ampacity.training.sdk.tensors import to_numpy

State = Mapping[str, Any]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveResult:
    """One rank's save: what the reporter sends and the controller records."""

    step: int
    path: Path | str  # the step directory, or its URI in object storage
    size_bytes: int  # what this rank wrote
    stall_seconds: float  # training blocked
    persist_seconds: float  # background write, fsync and commit
    committed: bool  # this rank found every index in and committed the manifest
    finished_at: float  # unix time this rank's persist ended (the commit time when committed)


_COPY_CHUNK_BYTES = 32 << 20


def _parallel_copy(pool: ThreadPoolExecutor, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Copy each (destination, source) pair, in chunks spread over the pool's threads."""
    chunks: list[Future[None]] = []
    for destination, source in pairs:
        if not (destination.flags.c_contiguous and source.flags.c_contiguous):
            np.copyto(destination, source)
            continue
        flat_destination, flat_source = destination.reshape(-1), source.reshape(-1)
        step = max(1, _COPY_CHUNK_BYTES // max(1, source.itemsize))
        for start in range(0, flat_source.size, step):
            chunk = slice(start, start + step)
            chunks.append(pool.submit(np.copyto, flat_destination[chunk], flat_source[chunk]))
    for done in chunks:
        done.result()


@dataclass(frozen=True)
class _Item:
    name: str
    array: np.ndarray
    torch_dtype: str | None
    spec: ShardSpec


def _items(state: State, shards: Mapping[str, ShardSpec] | None, rank: int) -> list[_Item]:
    """What this rank must write: its shards, plus the replicated parameters on rank 0."""
    shards = shards or {}
    unknown = set(shards) - set(state)
    if unknown:
        raise KeyError(f"shard specs for parameters not in the state: {sorted(unknown)}")
    items = []
    for name, value in state.items():
        spec = shards.get(name)
        if spec is None and rank != 0:
            continue
        array, torch_dtype = to_numpy(value)
        if spec is None:
            spec = ShardSpec(array.shape, (0,) * array.ndim, array.shape, None)
        elif tuple(array.shape) != tuple(spec.shape):
            raise ValueError(f"{name}: local shape {array.shape} != shard shape {spec.shape}")
        items.append(_Item(name, array, torch_dtype, spec))
    return items


def _write_array(path: Path, array: np.ndarray) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.lib.format.write_array(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    fsync_dir(path.parent)
    return size


def _persist(
    root: Path,
    step: int,
    items: list[_Item],
    *,
    rank: int,
    world_size: int,
    attempt: int,
    extra: Mapping[str, Any] | None,
    stall_seconds: float | None,
) -> SaveResult:
    """Write, fsync and commit; `stall_seconds` None means a synchronous save, all stall."""
    started = time.perf_counter()
    directory = step_dir(root, step)
    directory.mkdir(parents=True, exist_ok=True)
    params: dict[str, ParamEntry] = {}
    total = 0
    for item in items:
        file = fragment_file(item.name, rank, attempt)
        size = _write_array(directory / file, item.array)
        total += size
        params[item.name] = ParamEntry(
            global_shape=list(item.spec.global_shape),
            dtype=item.array.dtype.str,
            torch_dtype=item.torch_dtype,
            shard_axis=item.spec.axis,
            fragments=[
                Fragment(
                    file=file, offsets=list(item.spec.offsets), shape=list(item.spec.shape), file_bytes=size
                )
            ],
        )
    persist = time.perf_counter() - started
    stall = persist if stall_seconds is None else stall_seconds
    index = RankIndex(
        step=step,
        rank=rank,
        world_size=world_size,
        attempt=attempt,
        params=params,
        extra=dict(extra or {}) if rank == 0 else {},
        stall_seconds=stall,
        persist_seconds=persist,
    )
    atomic_write_text(directory / rank_index_file(rank, attempt), index.model_dump_json())
    committed = try_commit(directory, world_size, attempt)
    persist = time.perf_counter() - started
    return SaveResult(step, directory, total, stall, persist, committed, time.time())


def try_commit(directory: Path, world_size: int, attempt: int) -> bool:
    """Merge the rank indexes of `attempt` into the manifest once all `world_size` are present."""
    indexes = []
    for rank in range(world_size):
        path = directory / rank_index_file(rank, attempt)
        if not path.exists():
            return False
        indexes.append(RankIndex.model_validate_json(path.read_text()))
    params: dict[str, ParamEntry] = {}
    for index in indexes:
        for name, entry in index.params.items():
            if name in params:
                params[name].fragments.extend(entry.fragments)
            else:
                params[name] = entry.model_copy(deep=True)
    manifest = Manifest(
        step=indexes[0].step,
        world_size=world_size,
        attempt=attempt,
        created_at=time.time(),
        params=params,
        extra=indexes[0].extra,
        total_bytes=sum(f.file_bytes for e in params.values() for f in e.fragments),
        stall_seconds=max(i.stall_seconds for i in indexes),
        persist_seconds=max(i.persist_seconds for i in indexes),
    )
    atomic_write_text(directory / MANIFEST, manifest.model_dump_json())
    return True


def retain(root: Path, rank: int, policy: RetentionPolicy | None) -> list[int]:
    """Garbage-collect old checkpoints after a save, on rank 0 only; never raises into training.

    `plan_retention` keeps the latest complete checkpoint and anything newer still
    persisting, so running it while other ranks write is safe.
    """
    if rank != 0 or policy is None:
        return []
    try:
        return apply_retention(root, policy)
    except OSError as error:
        log.warning("checkpoint retention under %s failed: %s", root, error)
        return []


def save_checkpoint(
    root: Path,
    step: int,
    state: State,
    *,
    rank: int = 0,
    world_size: int = 1,
    shards: Mapping[str, ShardSpec] | None = None,
    extra: Mapping[str, Any] | None = None,
    attempt: int | None = None,
    retention: RetentionPolicy | None = None,
) -> SaveResult:
    """Synchronous save: training waits for the whole write, fsync and commit.

    `attempt` (default: AMPACITY_ATTEMPT) must be the same on every rank of the gang
    and grow with every restart. Rank 0 then applies `retention` (default: the job's,
    from AMPACITY_RETENTION_KEEP_LAST / _KEEP_EVERY; none outside a TrainingJob).
    """
    started = time.perf_counter()
    items = _items(state, shards, rank)
    result = _persist(
        root,
        step,
        items,
        rank=rank,
        world_size=world_size,
        attempt=attempt_from_env() if attempt is None else attempt,
        extra=extra,
        stall_seconds=None,
    )
    stall = time.perf_counter() - started
    retain(root, rank, retention or retention_from_env())
    return dataclasses.replace(result, stall_seconds=stall)


class AsyncCheckpointer:
    """Asynchronous two-phase saves of one rank into `root`.

    `save` returns after the snapshot (its stall); `on_complete` is called from the
    background thread with the result once the persist is done. An error in a
    background persist is raised by the next `save`, `wait` or `close`. `attempt`
    (default: AMPACITY_ATTEMPT) is the gang's restart count, the same on every rank.
    After each persist, rank 0 applies `retention` (default: the job's, from
    AMPACITY_RETENTION_KEEP_LAST / _KEEP_EVERY; none outside a TrainingJob).
    """

    def __init__(
        self,
        root: Path,
        *,
        rank: int = 0,
        world_size: int = 1,
        attempt: int | None = None,
        on_complete: Callable[[SaveResult], None] | None = None,
        retention: RetentionPolicy | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.attempt = attempt_from_env() if attempt is None else attempt
        self._on_complete = on_complete
        self.retention = retention or retention_from_env()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ckpt-persist-{rank}")
        # The snapshot is the whole stall and one core does not saturate memory bandwidth:
        # copy on every core (numpy releases the GIL while it copies).
        self._copiers = ThreadPoolExecutor(
            max_workers=os.cpu_count() or 1, thread_name_prefix=f"ckpt-copy-{rank}"
        )
        self._pending: Future[SaveResult] | None = None
        self._buffers: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def save(
        self,
        step: int,
        state: State,
        *,
        shards: Mapping[str, ShardSpec] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> float:
        """Snapshot `state` into host memory, start the persist, and return the stall in seconds."""
        started = time.perf_counter()
        with self._lock:
            self._wait_pending()
            items = _items(state, shards, self.rank)
            buffers = [self._buffer(item.name, item.array) for item in items]
            _parallel_copy(self._copiers, [(b, item.array) for b, item in zip(buffers, items, strict=True)])
            snapshot = [
                _Item(item.name, buffer, item.torch_dtype, item.spec)
                for item, buffer in zip(items, buffers, strict=True)
            ]
            # The extras are small; copy them now, training may mutate them meanwhile.
            extra_copy = copy.deepcopy(dict(extra or {}))
            stall = time.perf_counter() - started
            self._pending = self._executor.submit(self._persist_and_notify, step, snapshot, extra_copy, stall)
        return stall

    def reserve(self, state: State, *, shards: Mapping[str, ShardSpec] | None = None) -> None:
        """Allocate and touch the host buffers for `state` now (e.g. at startup), so that the
        first save is a plain copy too, as DataStates-LLM pre-allocates its host buffers."""
        with self._lock:
            self._wait_pending()
            items = _items(state, shards, self.rank)
            # Touch every page now so that the first save is a plain copy too.
            _parallel_copy(self._copiers, [(self._buffer(i.name, i.array), i.array) for i in items])

    def _buffer(self, name: str, array: np.ndarray) -> np.ndarray:
        """The reused host buffer for a parameter (C order, like the fragments it is written to)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != array.shape or buffer.dtype != array.dtype:
            buffer = np.empty(array.shape, array.dtype)
            self._buffers[name] = buffer
        return buffer

    def _persist_and_notify(
        self, step: int, snapshot: list[_Item], extra: dict[str, Any], stall: float
    ) -> SaveResult:
        result = _persist(
            self.root,
            step,
            snapshot,
            rank=self.rank,
            world_size=self.world_size,
            attempt=self.attempt,
            extra=extra,
            stall_seconds=stall,
        )
        if self._on_complete is not None:
            self._on_complete(result)
        retain(self.root, self.rank, self.retention)
        return result

    def _wait_pending(self) -> SaveResult | None:
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def wait(self) -> SaveResult | None:
        """Block until the in-flight persist (if any) is done; returns its result."""
        with self._lock:
            return self._wait_pending()

    def close(self) -> None:
        """Finish the in-flight persist and stop the background thread."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
            self._copiers.shutdown(wait=True)

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
