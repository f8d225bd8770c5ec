"""Progress reports from the trainer to the operator: step, save stall, persist time, completion.

The operator's endpoint (built by the TrainingJob controller) receives `TrainerReport` as
JSON in a POST with `Authorization: Bearer <token>` and may answer `TrainerReportAck`,
which carries the checkpoint interval now in force so the trainer can follow the `auto`
policy. The controller feeds `checkpoint.stall_seconds` / `persist_seconds` into
`ampacity.training.checkpoint_interval.auto_interval` and records the latest complete
checkpoint from reports with `committed` true.

Reporting is best effort: an unreachable operator must not stop training, so `report`
logs and counts failures and returns None; `send` raises for callers that care.

Environment read by `Reporter.from_env` (set by the controller on the worker pods):
AMPACITY_REPORT_URL, AMPACITY_REPORT_TOKEN or AMPACITY_REPORT_TOKEN_FILE (re-read on every
report, since projected service-account tokens rotate), AMPACITY_JOB_NAMESPACE,
AMPACITY_JOB_NAME, AMPACITY_ATTEMPT (the gang, so the operator can tell a late report of a
stopped gang) and the torchrun-style RANK and WORLD_SIZE.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import httpx
from pydantic import BaseModel, Field

from ampacity.training.sdk.save import SaveResult

log = logging.getLogger(__name__)


class CheckpointReport(BaseModel):
    """A save that finished on this rank since the previous report."""

    step: int = Field(ge=0)
    location: str  # the step directory
    size_bytes: int = Field(ge=0)  # bytes this rank wrote
    stall_seconds: float = Field(ge=0)  # training blocked by the save
    persist_seconds: float = Field(ge=0)  # background write + fsync + commit
    committed: bool  # this rank committed the manifest: the checkpoint is complete
    finished_at: datetime  # when this rank's persist ended (the commit time when committed)

    @classmethod
    def from_result(cls, result: SaveResult) -> CheckpointReport:
        return cls(
            step=result.step,
            location=str(result.path),
            size_bytes=result.size_bytes,
            stall_seconds=result.stall_seconds,
            persist_seconds=result.persist_seconds,
            committed=result.committed,
            finished_at=datetime.fromtimestamp(result.finished_at, UTC),
        )


class TrainerReport(BaseModel):
    """The JSON body of one POST to the operator's report endpoint."""

    schema_version: Literal[1] = 1
    namespace: str
    job: str
    rank: int = Field(ge=0)
    world_size: int = Field(ge=1)
    step: int = Field(ge=0)  # the training step the rank is at
    sent_at: datetime
    step_seconds: float | None = Field(default=None, ge=0)  # recent mean time per step
    checkpoint: CheckpointReport | None = None
    attempt: int | None = Field(default=None, ge=0)  # AMPACITY_ATTEMPT: which gang sent it


class TrainerReportAck(BaseModel):
    """What the operator may answer: the checkpoint interval in force and why."""

    checkpoint_interval_seconds: float | None = None
    reason: str | None = None


class Reporter:
    """POSTs `TrainerReport`s to the operator with a bearer token."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        job: str,
        token: str | None = None,
        token_file: Path | None = None,
        rank: int = 0,
        world_size: int = 1,
        attempt: int | None = None,
        timeout_seconds: float = 5.0,
    ) -> None:
        if token is None and token_file is None:
            raise ValueError("the report endpoint is authenticated: give a token or a token file")
        self.url = url
        self.namespace = namespace
        self.job = job
        self.rank = rank
        self.world_size = world_size
        self.attempt = attempt
        self.failures = 0
        self._token = token
        self._token_file = token_file
        self._client = httpx.Client(timeout=timeout_seconds)

    @classmethod
    def from_env(cls) -> Reporter | None:
        """A reporter configured by the controller's environment, or None outside a TrainingJob."""
        url = os.environ.get("AMPACITY_REPORT_URL")
        if not url:
            return None
        token_file = os.environ.get("AMPACITY_REPORT_TOKEN_FILE")
        return cls(
            url,
            namespace=os.environ.get("AMPACITY_JOB_NAMESPACE", "default"),
            job=os.environ["AMPACITY_JOB_NAME"],
            token=os.environ.get("AMPACITY_REPORT_TOKEN"),
            token_file=Path(token_file) if token_file else None,
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            attempt=int(attempt) if (attempt := os.environ.get("AMPACITY_ATTEMPT")) else None,
        )

    def build(
        self, step: int, *, checkpoint: SaveResult | None = None, step_seconds: float | None = None
    ) -> TrainerReport:
        return TrainerReport(
            namespace=self.namespace,
            job=self.job,
            rank=self.rank,
            world_size=self.world_size,
            step=step,
            sent_at=datetime.now(UTC),
            step_seconds=step_seconds,
            checkpoint=CheckpointReport.from_result(checkpoint) if checkpoint is not None else None,
            attempt=self.attempt,
        )

    def send(self, report: TrainerReport) -> TrainerReportAck | None:
        """POST one report; raises httpx errors (including non-2xx answers)."""
        token = self._token_file.read_text().strip() if self._token_file is not None else self._token
        response = self._client.post(
            self.url,
            content=report.model_dump_json(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        response.raise_for_status()
        if not response.content:
            return None
        return TrainerReportAck.model_validate_json(response.content)

    def report(
        self, step: int, *, checkpoint: SaveResult | None = None, step_seconds: float | None = None
    ) -> TrainerReportAck | None:
        """Best-effort `send`: failures are logged and counted, never raised into training."""
        try:
            return self.send(self.build(step, checkpoint=checkpoint, step_seconds=step_seconds))
        except (httpx.HTTPError, ValueError) as error:
            self.failures += 1
            log.warning("report of step %d to %s failed: %s", step, self.url, error)
            return None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
