"""The trainer report endpoint: progress, checkpoint commits and save costs from TrainingJob workers.

Workers POST a `TrainerReport` (ampacity.training.sdk.report) to
`/v1/namespaces/<ns>/trainingjobs/<job>/reports` with `Authorization: Bearer <token>`,
where the token is the job's own (`controllers.tokens`, derived from the operator key and the
job's uid): the TrainingJob controller writes it to the Secret `<job>-report-token`, mounted
into every worker; the endpoint checks a presented token by deriving it again (the operator
never reads Secrets). A report

- moves `status.currentStep` and the measured step time;
- records `status.latestCheckpoint` only for a checkpoint the trainer *committed* (its
  manifest renamed into place): a save reported with `committed: false` is torn or
  still persisting and is never resumed from;
- feeds the measured save stall and persist time into the `auto` interval (Young/Daly,
  async variant, `ampacity.training.checkpoint_interval.auto_interval`) together with
  the job's restarts, its exposure in node-hours and a prior from the InfiniteHBD trace;

and is answered with a `TrainerReportAck` carrying the interval in force.

One writer per status field: the endpoint writes only `REPORT_FIELDS`, as a merge patch of
just those fields; the reconciler's status patch leaves them out, except `currentStep` on the
pass that starts a new gang (from its resume step, before any worker of it can report). When a
failure or a policy change moves the interval, the reconciler asks the endpoint to decide it
again (`redecide_interval`, after its own status patch), so the interval too has one writer and
a report is never undone by a reconcile that read an older status. Reports
of one job are handled one at a time (they read, fold and write the job's status); progress
alone is written at most every PATCH_MIN_SECONDS, and what was held back is written when that
time is up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from ampacity.api.trainingjob import (
    CheckpointCost,
    CheckpointRecord,
    IntervalPolicy,
    TrainingJobSpec,
    TrainingJobStatus,
)
from ampacity.kube import Kube, KubeError
from ampacity.training.checkpoint_interval import (
    FailureRatePrior,
    IntervalDecision,
    auto_interval,
    fixed_interval,
)
from ampacity.training.failure_trace import load_failure_trace
from ampacity.training.sdk.report import TrainerReport, TrainerReportAck
from controllers import metrics, tokens

log = logging.getLogger(__name__)

#: Port the endpoint listens on.
REPORT_PORT = int(os.environ.get("AMPACITY_REPORT_PORT", "8082"))
#: How workers reach the operator (its Service in the cluster).
OPERATOR_URL = os.environ.get("AMPACITY_OPERATOR_URL", "http://ampacity-operator.ampacity-system.svc:8082")
#: Key of the token in the `<job>-report-token` Secret.
TOKEN_KEY = "token"
#: The interval the `auto` policy asks for before the first save has been measured.
FIRST_INTERVAL_SECONDS = 600.0
#: InfiniteHBD's fleet rate (333 faults, 400 nodes, 200 days) when the trace file is absent.
FALLBACK_NODE_FAILURE_RATE = 333 / (400 * 200 * 24)

#: Status fields the report endpoint writes; the reconciler's status patch leaves them out
#: unless that pass decided them anew (see the module docstring).
REPORT_FIELDS = (
    "current_step",
    "latest_checkpoint",
    "last_report_time",
    "step_seconds",
    "checkpoint_cost",
    "checkpoint_interval",
    "checkpoint_interval_reason",
)

#: The interval fields: decided by the endpoint alone (on reports, and when the reconciler asks).
INTERVAL_FIELDS = {"checkpoint_interval", "checkpoint_interval_reason"}

#: Fields whose change a report writes at once; progress alone waits for PATCH_MIN_SECONDS.
URGENT_FIELDS = {"latest_checkpoint", "checkpoint_cost", "checkpoint_interval"}
PATCH_MIN_SECONDS = 2.0


def token_secret_name(job: str) -> str:
    return f"{job}-report-token"


def report_path(namespace: str, job: str) -> str:
    return f"/v1/namespaces/{namespace}/trainingjobs/{job}/reports"


def report_url(namespace: str, job: str, base: str | None = None) -> str:
    return f"{(base or OPERATOR_URL).rstrip('/')}{report_path(namespace, job)}"


@functools.cache
def failure_prior() -> FailureRatePrior:
    """The per-node failure-rate prior: the InfiniteHBD trace's rate at the weight of two failures."""
    try:
        return FailureRatePrior.from_trace(load_failure_trace(), weight=2.0)
    except FileNotFoundError:
        return FailureRatePrior(FALLBACK_NODE_FAILURE_RATE, 2.0, "InfiniteHBD fleet rate (built in)")


def exposure_node_hours(status: TrainingJobStatus, now: datetime) -> float:
    """Node-hours the job has run: closed gangs plus the current one since it started."""
    running = 0.0
    if status.gang_start_time is not None:
        running = max(0.0, (now - status.gang_start_time).total_seconds()) / 3600 * max(1, status.nodes)
    return status.exposure_node_hours + running


def decide_interval(spec: TrainingJobSpec, status: TrainingJobStatus, now: datetime) -> IntervalDecision:
    """The checkpoint interval in force: declared (fixed) or Young/Daly from the measurements (auto)."""
    policy = spec.checkpoint.interval
    if policy.policy == IntervalPolicy.FIXED and policy.every is not None:
        return fixed_interval(policy.every)
    cost = status.checkpoint_cost
    if cost is None:
        return IntervalDecision(
            FIRST_INTERVAL_SECONDS,
            f"auto: {FIRST_INTERVAL_SECONDS / 60:g} min until the trainer reports a measured save",
        )
    return auto_interval(
        stall_seconds=cost.stall_seconds,
        persist_seconds=cost.persist_seconds,
        nodes=max(1, status.nodes),
        # The trace's fleet rate, moved by what this cluster's other jobs went through.
        prior=failure_prior().with_history(status.cluster_failures, status.cluster_exposure_node_hours),
        observed_failures=status.restarts,
        exposure_node_hours=exposure_node_hours(status, now),
    )


def set_interval(spec: TrainingJobSpec, status: TrainingJobStatus, now: datetime) -> IntervalDecision:
    decision = decide_interval(spec, status, now)
    # Whole seconds (at least one) keep the duration string short and stable.
    status.checkpoint_interval = float(max(1, round(decision.interval_seconds)))
    status.checkpoint_interval_reason = decision.reason
    return decision


def apply_report(
    spec: TrainingJobSpec, status: TrainingJobStatus, report: TrainerReport, now: datetime
) -> IntervalDecision:
    """Fold one report into the status; returns the interval decision to acknowledge.

    Progress and save costs count only from the current gang (a late report of a
    stopped gang says nothing about the running one). A committed checkpoint counts
    whichever gang wrote it: its manifest is complete for good. An uncommitted one
    never becomes the latest.
    """
    current = report.attempt is None or report.attempt == status.gang
    if current:
        status.current_step = max(status.current_step, report.step)
        if report.step_seconds is not None:
            status.step_seconds = report.step_seconds
        status.last_report_time = now
    checkpoint = report.checkpoint
    if checkpoint is not None:
        cost = status.checkpoint_cost
        if current and (cost is None or checkpoint.step > cost.step):
            status.checkpoint_cost = CheckpointCost(
                step=checkpoint.step,
                stall_seconds=checkpoint.stall_seconds,
                persist_seconds=checkpoint.persist_seconds,
            )
        elif current and cost is not None and checkpoint.step == cost.step:
            # Every rank reports its own save of the step: the slowest one sets the pace.
            cost.stall_seconds = max(cost.stall_seconds, checkpoint.stall_seconds)
            cost.persist_seconds = max(cost.persist_seconds, checkpoint.persist_seconds)
        latest = status.latest_checkpoint
        if checkpoint.committed and (latest is None or checkpoint.step > latest.step):
            status.latest_checkpoint = CheckpointRecord(
                step=checkpoint.step,
                time=checkpoint.finished_at,
                size_bytes=checkpoint.size_bytes,
                stall_seconds=checkpoint.stall_seconds,
                persist_seconds=checkpoint.persist_seconds,
            )
            if current:
                status.current_step = max(status.current_step, checkpoint.step)
    return set_interval(spec, status, now)


def export_metrics(namespace: str, job: str, status: TrainingJobStatus) -> None:
    """The gauges of the trainer-reported fields, set by whichever writer recorded them: the
    endpoint when a report lands, the reconciler on its passes (after an operator restart)."""
    if status.latest_checkpoint is not None:
        metrics.TRAINING_JOB_LAST_CHECKPOINT.labels(namespace, job).set(
            status.latest_checkpoint.time.timestamp()
        )
    if status.checkpoint_interval is not None:
        metrics.TRAINING_JOB_CHECKPOINT_INTERVAL.labels(namespace, job).set(status.checkpoint_interval)


# --- authentication ------------------------------------------------------------------------------


def report_token(uid: str) -> str:
    """The job's report token: derived from the operator key and the job's uid."""
    return tokens.derive_token(tokens.TRAINING_REPORT, uid)


def token_hash(token: str) -> str:
    """What the status keeps of a job's report token (`status.reportTokenHash`)."""
    return tokens.token_hash(token)


def token_matches(obj: dict[str, Any], presented: str) -> bool:
    """Whether `presented` is the token of this TrainingJob (of its uid: a job recreated under
    the same name has another)."""
    return tokens.verify(tokens.TRAINING_REPORT, str(obj["metadata"].get("uid", "")), presented)


# --- the HTTP endpoint ---------------------------------------------------------------------------


class ReportEndpoint:
    """The endpoint's state for the operator's lifetime (kept in kopf's memo, closed at cleanup)."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.runner: web.AppRunner | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._last_patch: dict[str, float] = {}
        self._held: dict[str, tuple[str, str, dict[str, Any]]] = {}
        self._flushes: dict[str, asyncio.Task[None]] = {}
        #: Status writes per namespace/job, so a report that waited for another one reads again.
        self._writes: dict[str, int] = {}

    def forget(self, uid: str, namespace: str, job: str) -> None:
        """A deleted job: drop what is kept for it."""
        self._locks.pop(uid, None)
        self._last_patch.pop(uid, None)
        self._held.pop(uid, None)
        self._writes.pop(f"{namespace}/{job}", None)
        task = self._flushes.pop(uid, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        for task in self._flushes.values():
            task.cancel()
        if self.runner is not None:
            await self.runner.cleanup()

    async def _write(self, uid: str, namespace: str, job: str, fields: dict[str, Any]) -> None:
        await self.kube.patch_status("TrainingJob", namespace, job, fields)
        self._last_patch[uid] = time.monotonic()
        self._writes[f"{namespace}/{job}"] = self._writes.get(f"{namespace}/{job}", 0) + 1
        self._held.pop(uid, None)

    async def _flush_later(self, uid: str) -> None:
        """Write the progress held back once PATCH_MIN_SECONDS have passed since the last write."""
        try:
            wait = self._last_patch.get(uid, 0.0) + PATCH_MIN_SECONDS - time.monotonic()
            await asyncio.sleep(max(0.0, wait))
            async with self._locks.setdefault(uid, asyncio.Lock()):
                held = self._held.get(uid)
                if held is not None:
                    try:
                        await self._write(uid, *held)
                    except KubeError as error:
                        log.warning("writing the held-back progress of %s/%s: %s", held[0], held[1], error)
        finally:
            self._flushes.pop(uid, None)

    async def redecide_interval(
        self, namespace: str, job: str, written: dict[str, Any] | None = None
    ) -> None:
        """Decide the job's interval again from its status as it is now (the reconciler asks, once
        its pass recorded a failure or saw a policy change) and write it if it moved. `written` is
        the job as the reconciler's status patch returned it: current unless a report was written
        for the job (then it is read again)."""
        try:
            obj = written
            if obj is None or self._writes.get(f"{namespace}/{job}", 0):
                obj = await self.kube.get("TrainingJob", namespace, job)
            if obj is None:
                return
            spec = TrainingJobSpec.model_validate(obj.get("spec") or {})
        except (KubeError, ValidationError) as error:
            log.warning("deciding the checkpoint interval of %s/%s again: %s", namespace, job, error)
            return
        uid = str(obj["metadata"]["uid"])
        async with self._locks.setdefault(uid, asyncio.Lock()):
            if self._writes.get(f"{namespace}/{job}", 0):  # a report may have written since our read
                obj = await self.kube.get("TrainingJob", namespace, job) or obj
            held = self._held.get(uid)
            status = _status_of({"status": {**(obj.get("status") or {}), **(held[2] if held else {})}})
            before = status.model_dump(include=INTERVAL_FIELDS)
            set_interval(spec, status, datetime.now(UTC))
            export_metrics(namespace, job, status)
            if status.model_dump(include=INTERVAL_FIELDS) != before:
                fields = status.model_dump(mode="json", by_alias=True, include=set(REPORT_FIELDS))
                try:
                    await self._write(uid, namespace, job, fields)
                except KubeError as error:
                    log.warning("writing the checkpoint interval of %s/%s: %s", namespace, job, error)

    async def handle(self, request: web.Request) -> web.Response:
        namespace, job = request.match_info["namespace"], request.match_info["job"]
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _error(401, "a bearer token is required")
        try:
            writes_seen = self._writes.get(f"{namespace}/{job}", 0)
            obj = await self.kube.get("TrainingJob", namespace, job)
            # An unknown job and a wrong token look the same to a caller without the token.
            if obj is None or not token_matches(obj, token.strip()):
                return _error(401, f"no trainingjob {namespace}/{job} with that token")
            try:
                report = TrainerReport.model_validate_json(await request.read())
            except ValidationError as error:
                return _error(400, f"not a TrainerReport: {error.errors(include_url=False)}")
            if (report.namespace, report.job) != (namespace, job):
                return _error(400, f"report names {report.namespace}/{report.job}, the URL {namespace}/{job}")
            try:
                spec = TrainingJobSpec.model_validate(obj.get("spec") or {})
            except ValidationError:
                return _error(409, f"trainingjob {namespace}/{job} has an invalid spec")
            uid = str(obj["metadata"]["uid"])
            # Reports of one job one at a time: each reads, folds and writes the job's status.
            async with self._locks.setdefault(uid, asyncio.Lock()):
                if (
                    self._writes.get(f"{namespace}/{job}", 0) != writes_seen
                ):  # another report wrote since our read
                    obj = await self.kube.get("TrainingJob", namespace, job) or obj
                held = self._held.get(uid)
                # Progress held back (not written yet) counts as recorded.
                status = _status_of({"status": {**(obj.get("status") or {}), **(held[2] if held else {})}})
                before = status.model_dump(include=URGENT_FIELDS)
                decision = apply_report(spec, status, report, datetime.now(UTC))
                export_metrics(namespace, job, status)
                fields = status.model_dump(mode="json", by_alias=True, include=set(REPORT_FIELDS))
                # Progress alone is written at most every PATCH_MIN_SECONDS per job (every rank
                # reports); what is held back is written when that time is up.
                urgent = status.model_dump(include=URGENT_FIELDS) != before
                last = self._last_patch.get(uid, -PATCH_MIN_SECONDS)
                if urgent or time.monotonic() - last >= PATCH_MIN_SECONDS:
                    await self._write(uid, namespace, job, fields)
                else:
                    self._held[uid] = (namespace, job, fields)
                    if uid not in self._flushes:
                        self._flushes[uid] = asyncio.create_task(self._flush_later(uid))
        except KubeError as error:
            log.warning("report for %s/%s: %s", namespace, job, error)
            return _error(502, f"the API server refused: {error}")
        ack = TrainerReportAck(checkpoint_interval_seconds=status.checkpoint_interval, reason=decision.reason)
        return web.json_response(text=ack.model_dump_json())


def _status_of(obj: dict[str, Any]) -> TrainingJobStatus:
    try:
        return TrainingJobStatus.model_validate(obj.get("status") or {})
    except ValidationError:
        return TrainingJobStatus()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


ENDPOINT: web.AppKey[ReportEndpoint] = web.AppKey("endpoint", ReportEndpoint)


def make_app(kube: Kube) -> web.Application:
    endpoint = ReportEndpoint(kube)
    app = web.Application(client_max_size=1 << 20)
    app[ENDPOINT] = endpoint
    app.router.add_post(report_path("{namespace}", "{job}"), endpoint.handle)
    return app


async def start(kube: Kube, port: int = REPORT_PORT, host: str = "0.0.0.0") -> ReportEndpoint:
    """Serve the endpoint on `host:port` (every interface: workers reach it through a Service)."""
    app = make_app(kube)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("trainer report endpoint on %s:%d", host, port)
    endpoint = app[ENDPOINT]
    endpoint.runner = runner
    return endpoint


async def stop(endpoint: ReportEndpoint) -> None:
    await endpoint.close()
