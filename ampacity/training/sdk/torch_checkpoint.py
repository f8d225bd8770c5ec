"""PyTorch checkpoints through torch.distributed.checkpoint (DCP), committed by a manifest.

    state = TrainState(model, optimizer)           # get_state_dict / set_state_dict underneath
    with Checkpointer() as ckpt:                   # AMPACITY_CHECKPOINT_URI: path, file://, s3://, gs://
        resumed = ckpt.load_latest(state)          # resharded to this world size by DCP's planner
        for step in range(resumed.step + 1 if resumed else 0, steps):
            ...
            if step % every == 0:
                ckpt.save(step, state, extra={"data_position": pos})   # returns the stall

The division of labour follows DCP's own: `dcp.async_save` stages the state into host
memory (a reused `DefaultStager`, so later saves are a copy into the same buffers) and
returns; that is the stall, the only part training waits for. The upload (DCP's planning
collectives, every rank writing its own shards through `FsspecWriter`, the coordinator's
`.metadata`) runs in DCP's background thread on a process group of its own, so its
collectives never interleave with training's. When the upload completes on rank 0 every
rank's data and DCP's metadata are in place; rank 0 then commits `manifest.json` (step,
world size, attempt, the caller's `extra`, the measured costs): only then does the
checkpoint count, for `load_latest`, for retention, and in the report to the operator.

Loading goes through `dcp.load` into the caller's state: DTensor / FSDP2 / DDP state
dicts are resharded to the current world size by DCP's default load planner.

At most one save is in flight: a save first waits for the previous one (counted as
stall), which is why the interval policy never asks for checkpoints closer than the
persist time.

With `overlap_staging=True` a save of a `TrainState` does not wait for the staging
either (DCP's zero-overhead checkpointing: `DefaultStager` with asynchronous staging):
`save` returns once the copy has started, the copy runs beside the next forward and
backward passes, which read the parameters but do not write them, and a hook on each of
the state's optimizers waits for the copy before `optimizer.step()` changes anything.
The stall is then the save call plus whatever that hook had to wait. Parameters written
outside `optimizer.step()` (an EMA, a manual clamp) must call `staged()` first; buffers
that the forward pass updates (BatchNorm's running statistics) may be saved from the
next step. A plain state dict has no optimizer to guard, so it is always staged before
`save` returns.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse, async_save

from ampacity.training.retention import RetentionPolicy
from ampacity.training.sdk.layout import attempt_from_env, retention_from_env
from ampacity.training.sdk.save import SaveResult
from ampacity.training.sdk.storage import CheckpointStore, Manifest, storage_options_from_env

log = logging.getLogger(__name__)


class TrainState:
    """A model and its optimizers as one DCP `Stateful`, in the state dicts PyTorch builds for them.

    `get_state_dict` / `set_state_dict` understand FSDP2 (fully_shard), DDP and tensor
    parallel modules and nested optimizer state; DCP saves each rank's shards and
    reshards them on load.
    """

    def __init__(
        self, model: torch.nn.Module, optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] = ()
    ) -> None:
        self.model = model
        self.optimizers = (
            (optimizers,) if isinstance(optimizers, torch.optim.Optimizer) else tuple(optimizers)
        )

    def state_dict(self) -> dict[str, Any]:
        model, optimizer = get_state_dict(self.model, self.optimizers)
        return {"model": model, "optimizer": optimizer}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizers,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optimizer"],
        )


@dataclass(frozen=True)
class Restored:
    """What `load_latest` resumed from."""

    step: int
    uri: str
    saved_world_size: int
    extra: dict[str, Any]


def _stager(cuda: bool, *, asynchronous: bool) -> DefaultStager:
    """DCP's stager, reused across saves so that later saves copy into the same buffers."""
    return DefaultStager(
        StagingOptions(
            use_pinned_memory=cuda,
            use_shared_memory=False,
            use_async_staging=asynchronous,
            use_non_blocking_copy=cuda,
        )
    )


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _bytes_written(metadata: Metadata, rank: int | None) -> int:
    """Bytes DCP recorded for one rank's files (`__<rank>_<n>.distcp`), or for all with None."""
    storage = metadata.storage_data if isinstance(metadata.storage_data, Mapping) else {}
    prefix = f"__{rank}_" if rank is not None else ""
    return sum(int(info.length) for info in storage.values() if str(info.relative_path).startswith(prefix))


class Checkpointer:
    """Asynchronous DCP saves and resharding loads of one job's checkpoints.

    Construct it on every rank after `init_process_group` (it creates a gloo group for the
    background collectives, a collective call itself). `uri` and `storage_options`
    default to the job's (AMPACITY_CHECKPOINT_URI, AMPACITY_CHECKPOINT_ENDPOINT);
    `attempt` to AMPACITY_ATTEMPT; `retention` to the job's (applied by rank 0 after
    each commit). `on_complete` is called from a background thread with each rank's
    `SaveResult` once its save is done (`committed` is true on rank 0 after the
    manifest is in). An error in a background save is raised by the next `save`,
    `wait` or `close`. `overlap_staging` lets a `TrainState`'s copy run beside training
    until its optimizers' next step (see the module's docstring).
    """

    def __init__(
        self,
        uri: str | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        attempt: int | None = None,
        on_complete: Callable[[SaveResult], None] | None = None,
        retention: RetentionPolicy | None = None,
        overlap_staging: bool = False,
    ) -> None:
        options = dict(storage_options_from_env() if storage_options is None else storage_options)
        self.store = CheckpointStore(uri, options) if uri else CheckpointStore.from_env()
        self.rank, self.world_size = _rank_and_world()
        self.attempt = attempt_from_env() if attempt is None else attempt
        self.retention = retention or retention_from_env()
        self._on_complete = on_complete
        distributed = dist.is_available() and dist.is_initialized()
        group = dist.new_group(backend="gloo") if distributed else None
        self._group = group if isinstance(group, dist.ProcessGroup) else None
        cuda = torch.cuda.is_available()
        # Synchronous staging: the save returns once the state is in host memory, which is
        # exactly what training must wait for; the stager caches those buffers across saves.
        self._stager = _stager(cuda, asynchronous=False)
        # A second stager for overlapped saves (each keeps its own buffers; DefaultStager fixes
        # sync or async at construction).
        self._overlap_stager = _stager(cuda, asynchronous=True) if overlap_staging else None
        self._staging: Future[None] | None = None
        self._staging_wait = 0.0
        # Held while a hook waits for the staging, so the commit reads the whole stall.
        self._staging_lock = threading.Lock()
        self._hooks: dict[int, Any] = {}
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ckpt-commit-{self.rank}")
        self._pending: Future[SaveResult] | None = None
        self._lock = threading.Lock()
        self._last_step = -1

    def save(
        self, step: int, state: Mapping[str, Any] | Any, *, extra: Mapping[str, Any] | None = None
    ) -> float:
        """Stage `state` (a state dict, or a `Stateful` such as `TrainState`) and start its upload.

        Returns the stall in seconds. Every rank calls it with the same `step`.
        """
        started = time.perf_counter()
        with self._lock:
            self._wait_pending()
            if step <= self._last_step:
                raise ValueError(f"step {step} is not after the last checkpoint, step {self._last_step}")
            state_dict = dict(state) if isinstance(state, Mapping) else {"state": state}
            stager = self._stager
            if self._overlap_stager is not None and isinstance(state, TrainState):
                self._guard(state.optimizers)
                stager = self._overlap_stager
            overlap = stager is self._overlap_stager
            response = async_save(
                state_dict,
                storage_writer=FsspecWriter(self.store.step_uri(step), **self.store.storage_options),
                process_group=self._group,
                async_stager=stager,
                no_dist=self._group is None,
            )
            upload = response.upload_completion if isinstance(response, AsyncSaveResponse) else response
            if isinstance(response, AsyncSaveResponse):
                if overlap:
                    self._staging, self._staging_wait = response.staging_completion, 0.0
                else:
                    response.staging_completion.result()
            stall = time.perf_counter() - started
            self._last_step = step
            # Small, and training may change it meanwhile.
            extra_copy = copy.deepcopy(dict(extra or {}))
            self._pending = self._finisher.submit(self._finish, step, upload, stall, extra_copy)
        return stall

    def _guard(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Make each optimizer's step wait for the overlapped copy (once per optimizer)."""

        def before_step(*_: object) -> None:  # a pre-hook returning a value would replace the args
            self.staged()

        for optimizer in optimizers:
            if id(optimizer) not in self._hooks:
                self._hooks[id(optimizer)] = optimizer.register_step_pre_hook(before_step)

    def staged(self) -> float:
        """Wait until the overlapped save's copy is done (before changing the saved state).

        Returns the seconds waited, which count as stall. Immediate when nothing is staging.
        """
        with self._staging_lock:
            staging = self._staging
            if staging is None or staging.done():
                return 0.0
            started = time.perf_counter()
            staging.result()
            waited = time.perf_counter() - started
            self._staging_wait += waited
            return waited

    def _finish(self, step: int, upload: Future[Any], stall: float, extra: dict[str, Any]) -> SaveResult:
        uploading_since = time.perf_counter()
        metadata: Metadata = upload.result()
        # The upload ends after the staging, so a hook still waiting on it is about to return.
        with self._staging_lock:
            stall += self._staging_wait
            self._staging, self._staging_wait = None, 0.0
        committed = False
        if self.rank == 0:
            self.store.commit(
                Manifest(
                    step=step,
                    world_size=self.world_size,
                    attempt=self.attempt,
                    created_at=time.time(),
                    total_bytes=_bytes_written(metadata, None),
                    stall_seconds=stall,
                    persist_seconds=time.perf_counter() - uploading_since,
                    extra=extra,
                )
            )
            committed = True
        result = SaveResult(
            step=step,
            path=self.store.step_uri(step),
            size_bytes=_bytes_written(metadata, self.rank),
            stall_seconds=stall,
            persist_seconds=time.perf_counter() - uploading_since,
            committed=committed,
            finished_at=time.time(),
        )
        if self._on_complete is not None:
            self._on_complete(result)
        if committed and self.retention is not None:
            try:
                self.store.apply_retention(self.retention)
            except OSError as error:
                log.warning("checkpoint retention under %s failed: %s", self.store.uri, error)
        return result

    def load_latest(self, state: Mapping[str, Any] | Any) -> Restored | None:
        """Load the latest committed checkpoint into `state` in place; None when there is none.

        Rank 0 picks the checkpoint and tells the others, so that a commit landing
        meanwhile cannot make ranks load different steps.
        """
        with self._lock:
            self._wait_pending()
            latest = self.store.latest_committed() if self.rank == 0 else None
            chosen = [latest.step if latest is not None else -1]
            if self._group is not None:
                dist.broadcast_object_list(chosen, src=0, group=self._group)
            step = int(chosen[0])
            if step < 0:
                return None
            manifest = self.store.read_manifest(step)
            state_dict = dict(state) if isinstance(state, Mapping) else {"state": state}
            load(
                state_dict,
                storage_reader=FsspecReader(self.store.step_uri(step), **self.store.storage_options),
                process_group=self._group,
                no_dist=self._group is None,
            )
            self._last_step = step
            return Restored(step, self.store.step_uri(step), manifest.world_size, manifest.extra)

    def _wait_pending(self) -> SaveResult | None:
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def wait(self) -> SaveResult | None:
        """Block until the save in flight (if any) is committed; returns this rank's result."""
        with self._lock:
            return self._wait_pending()

    def close(self) -> None:
        """Finish the save in flight and release the staging buffers and threads."""
        try:
            self.wait()
        finally:
            self._finisher.shutdown(wait=True)
            for hook in self._hooks.values():
                hook.remove()
            self._hooks.clear()
            self._stager.close()
            if self._overlap_stager is not None:
                self._overlap_stager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
