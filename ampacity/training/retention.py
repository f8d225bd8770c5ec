"""Which checkpoints to garbage-collect, as a pure decision over checkpoint records.

Rules, in order of precedence:
- the latest complete checkpoint is never deleted: it is what a restart resumes from;
- an incomplete checkpoint newer than it is never deleted: its persist may still be
  running (the manifest is committed last);
- an incomplete checkpoint older than it is deleted: checkpoints are persisted in step
  order, so it was torn by a crash and can never complete;
- the `keep_last` newest complete checkpoints are kept;
- with `keep_every` = K > 0, the first complete checkpoint at or after each multiple of K
  steps is kept for good. With an automatic interval the saved steps rarely land on a
  multiple of K exactly, so "the first at or after" keeps one per K-step window;
- every other complete checkpoint is deleted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointRecord:
    """What the controller knows of one checkpoint directory."""

    step: int
    complete: bool
    time: float  # when it was started (unix seconds); informative only


@dataclass(frozen=True)
class RetentionPolicy:
    """Mirrors the TrainingJob's `checkpoint.retention`: `keep_every` 0 means none."""

    keep_last: int = 1
    keep_every: int = 0

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ValueError("keep_last must be >= 1: the latest complete checkpoint is always kept")
        if self.keep_every < 0:
            raise ValueError("keep_every must be >= 0 steps")


@dataclass(frozen=True)
class RetentionPlan:
    keep: tuple[int, ...]
    delete: tuple[int, ...]


def plan_retention(records: Sequence[CheckpointRecord], policy: RetentionPolicy) -> RetentionPlan:
    """Split the checkpoint steps into those to keep and those to delete (both ascending)."""
    steps = [r.step for r in records]
    if len(set(steps)) != len(steps):
        raise ValueError("duplicate checkpoint steps")
    complete = sorted(r.step for r in records if r.complete)
    if not complete:
        # Nothing to resume from yet: deleting anything could only lose the first checkpoint.
        return RetentionPlan(tuple(sorted(steps)), ())
    latest = complete[-1]
    keep = set(complete[-policy.keep_last :])
    keep.update(r.step for r in records if not r.complete and r.step > latest)
    if policy.keep_every:
        windows: set[int] = set()
        for step in complete:
            # (previous, step] holds a multiple of K exactly when step // K moved on.
            window = step // policy.keep_every
            if window not in windows:
                windows.add(window)
                keep.add(step)
    delete = sorted(set(steps) - keep)
    return RetentionPlan(tuple(sorted(keep)), tuple(delete))
