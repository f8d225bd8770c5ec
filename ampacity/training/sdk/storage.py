"""Checkpoint storage behind one URI: a local or PVC path, `file://`, `s3://` or `gs://`, through fsspec.

    <uri>/step-000000001200/
        .metadata, __0_0.distcp, ...   what torch.distributed.checkpoint writes
        manifest.json                  written last, by rank 0: the checkpoint is committed

The operator gives the URI to every worker as AMPACITY_CHECKPOINT_URI and, for an
S3-compatible store that is not AWS, its endpoint as AMPACITY_CHECKPOINT_ENDPOINT. The
credentials come from the Secret the job names, as the environment variables the
store's own client reads (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3fs through
botocore, GOOGLE_APPLICATION_CREDENTIALS for gcsfs); this module never handles them.

A step directory without a manifest is torn (a crash mid-save, or a persist still
running) and is never resumed from. The manifest is written to a temporary name and
moved into place: a rename on a file system, a single PUT on an object store, so a
reader sees all of it or none of it.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec  # type: ignore[import-untyped]
from fsspec.core import url_to_fs  # type: ignore[import-untyped]

from ampacity.training.retention import CheckpointRecord, RetentionPolicy, plan_retention

FORMAT = "ampacity-dcp-checkpoint/1"
MANIFEST = "manifest.json"
URI_ENV = "AMPACITY_CHECKPOINT_URI"
ENDPOINT_ENV = "AMPACITY_CHECKPOINT_ENDPOINT"
_STEP_DIR = re.compile(r"^step-(\d{12})$")


def storage_options_from_env() -> dict[str, Any]:
    """fsspec options from the controller's environment: the endpoint of an S3-compatible store."""
    endpoint = os.environ.get(ENDPOINT_ENV)
    return {"endpoint_url": endpoint} if endpoint else {}


def step_name(step: int) -> str:
    return f"step-{step:012d}"


@dataclass(frozen=True)
class StoredCheckpoint:
    """One step directory found under the root."""

    step: int
    uri: str  # full URI of the step directory (what DCP's fsspec reader and writer take)
    committed: bool


@dataclass(frozen=True)
class Manifest:
    """What rank 0 commits once every rank's data and DCP's metadata are written."""

    step: int
    world_size: int
    attempt: int
    created_at: float
    total_bytes: int
    stall_seconds: float  # rank 0's
    persist_seconds: float  # rank 0's, up to the commit
    extra: dict[str, Any]
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} manifest: {data.get('format')!r}")
        return cls(**data)


class CheckpointStore:
    """The step directories under one checkpoint root URI."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        fs, root = url_to_fs(self.uri, **self.storage_options)
        self.fs: fsspec.AbstractFileSystem = fs
        self.root: str = root.rstrip("/")

    @classmethod
    def from_env(cls) -> CheckpointStore:
        """The job's store, from AMPACITY_CHECKPOINT_URI and AMPACITY_CHECKPOINT_ENDPOINT."""
        uri = os.environ.get(URI_ENV)
        if not uri:
            raise RuntimeError(f"{URI_ENV} is not set: give the checkpoint URI (the operator sets it)")
        return cls(uri, storage_options_from_env())

    def step_uri(self, step: int) -> str:
        return f"{self.uri}/{step_name(step)}"

    def _step_path(self, step: int) -> str:
        return f"{self.root}/{step_name(step)}"

    def checkpoints(self) -> list[StoredCheckpoint]:
        """Every step directory, ascending, with whether its manifest is committed."""
        # Other ranks and other gangs write here: never answer from a cached listing.
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            return []
        found = []
        for path in self.fs.ls(self.root, detail=False):
            match = _STEP_DIR.match(str(path).rstrip("/").rsplit("/", 1)[-1])
            if match is None:
                continue
            step = int(match[1])
            found.append(StoredCheckpoint(step, self.step_uri(step), self.committed(step)))
        return sorted(found, key=lambda c: c.step)

    def committed(self, step: int) -> bool:
        try:
            self.read_manifest(step)
        except (FileNotFoundError, ValueError, TypeError):
            return False
        return True

    def latest_committed(self) -> StoredCheckpoint | None:
        committed = [c for c in self.checkpoints() if c.committed]
        return committed[-1] if committed else None

    def read_manifest(self, step: int) -> Manifest:
        """The committed manifest of `step`; FileNotFoundError if the checkpoint is torn."""
        with self.fs.open(f"{self._step_path(step)}/{MANIFEST}", "r") as f:
            return Manifest.from_json(f.read())

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest last: a temporary object or file, moved into place."""
        directory = self._step_path(manifest.step)
        temporary = f"{directory}/.{MANIFEST}.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(temporary, manifest.to_json().encode())
        self.fs.mv(temporary, f"{directory}/{MANIFEST}")

    def delete(self, step: int) -> None:
        """Remove the manifest first, so a half-deleted checkpoint reads as torn, never as committed."""
        directory = self._step_path(step)
        manifest = f"{directory}/{MANIFEST}"
        if self.fs.exists(manifest):
            self.fs.rm_file(manifest)
        if self.fs.exists(directory):
            self.fs.rm(directory, recursive=True)

    def apply_retention(self, policy: RetentionPolicy) -> list[int]:
        """Delete what `plan_retention` lets go (never the latest committed one); the deleted steps."""
        records = [CheckpointRecord(c.step, c.committed, time.time()) for c in self.checkpoints()]
        plan = plan_retention(records, policy)
        for step in plan.delete:
            self.delete(step)
        return list(plan.delete)
