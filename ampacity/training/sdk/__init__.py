"""The trainer SDK: what a training script imports to checkpoint and report.

    from ampacity.training.sdk import AsyncCheckpointer, Reporter, latest_complete, load_checkpoint

    reporter = Reporter.from_env()  # None outside a TrainingJob
    if latest_complete(root) is not None:  # resharded if the world size changed
        resumed = load_checkpoint(root, rank=rank, world_size=world)
    with AsyncCheckpointer(root, rank=rank, world_size=world,
                           on_complete=lambda r: reporter and reporter.report(r.step, checkpoint=r)) as ckpt:
        ckpt.reserve(state, shards=shards)  # host buffers, once
        ...
        stall = ckpt.save(step, state, shards=shards, extra={"data_position": pos})

Numpy arrays are first-class; torch tensors work when torch is installed.
"""

from ampacity.training.sdk.layout import (
    CheckpointInfo,
    Manifest,
    ShardSpec,
    apply_retention,
    even_shard,
    latest_complete,
    list_checkpoints,
    read_manifest,
    shard_array,
)
from ampacity.training.sdk.load import LoadedCheckpoint, TornCheckpointError, load_checkpoint
from ampacity.training.sdk.report import CheckpointReport, Reporter, TrainerReport, TrainerReportAck
from ampacity.training.sdk.save import AsyncCheckpointer, SaveResult, save_checkpoint

__all__ = [
    "AsyncCheckpointer",
    "CheckpointInfo",
    "CheckpointReport",
    "LoadedCheckpoint",
    "Manifest",
    "Reporter",
    "SaveResult",
    "ShardSpec",
    "TornCheckpointError",
    "TrainerReport",
    "TrainerReportAck",
    "apply_retention",
    "even_shard",
    "latest_complete",
    "list_checkpoints",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
    "shard_array",
]
