"""The trainer report endpoint: progress, checkpoint commits and save costs from TrainingJob workers.

Workers POST a `TrainerReport` (ampacity.training.sdk.report) to
`/v1/namespaces/<ns>/trainingjobs/<job>/reports` with `Authorization: Bearer <token>`,
where the token is the job's own: the TrainingJob controller writes it to the Secret
`<job>-report-token`, mounted into every worker, and keeps only its SHA-256 in
`status.reportTokenHash` (the operator never reads Secrets). A report

- moves `status.currentStep` and the measured step time;
- records `status.latestCheckpoint` only for a checkpoint the trainer *committed* (its
  manifest renamed into place): a save reported with `committed: false` is torn or
  still persisting and is never resumed from;
- feeds the measured save stall and persist time into the `auto` interval (Young/Daly,
  async variant, `ampacity.training.checkpoint_interval.auto_interval`) together with
  the job's restarts, its exposure in node-hours and a prior from the InfiniteHBD trace;

and is answered with a `TrainerReportAck` carrying the interval in force.

The reconciler writes the whole status at the end of each pass, so both writers go
through `job_lock` and keep the report-owned fields in an in-process copy (`overlay` /
`remember`): a reconcile starts from what the reports recorded, never from an older
status. (A report landing between a pass and kopf's status write can be undone by that
write for one refresh interval; the next pass puts it back.)
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
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

#: Status fields a report writes; the reconciler keeps them as the report handler left them.
REPORT_FIELDS = (
    "current_step",
    "latest_checkpoint",
    "last_report_time",
    "step_seconds",
    "checkpoint_cost",
    "checkpoint_interval",
    "checkpoint_interval_reason",
)

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


# --- what the report handler and the reconciler share in this process ---------------------------

_locks: dict[str, asyncio.Lock] = {}
_reported: dict[str, dict[str, Any]] = {}
_last_patch: dict[str, float] = {}


def job_lock(uid: str) -> asyncio.Lock:
    """One writer of a job's status at a time: the reconciler or a report."""
    return _locks.setdefault(uid, asyncio.Lock())


def overlay(uid: str, status: TrainingJobStatus) -> None:
    """Put the report-owned fields this process last wrote over a (possibly older) status."""
    for name, value in _reported.get(uid, {}).items():
        setattr(status, name, value.model_copy(deep=True) if hasattr(value, "model_copy") else value)


def remember(uid: str, status: TrainingJobStatus) -> None:
    _reported[uid] = {
        name: (value.model_copy(deep=True) if hasattr(value, "model_copy") else value)
        for name in REPORT_FIELDS
        for value in [getattr(status, name)]
    }


def forget(uid: str) -> None:
    _reported.pop(uid, None)
    _last_patch.pop(uid, None)
    _locks.pop(uid, None)
    for key, (known, _) in list(_token_hashes.items()):
        if known == uid:
            del _token_hashes[key]


# --- authentication ------------------------------------------------------------------------------

_token_hashes: dict[tuple[str, str], tuple[str, str]] = {}


def token_hash(token: str) -> str:
    """What the operator keeps of a job's report token: its SHA-256 (the token is 256 random bits)."""
    return hashlib.sha256(token.encode()).hexdigest()


def remember_token(namespace: str, job: str, uid: str, digest: str) -> None:
    """The hash the reconciler just issued, good before its status patch lands."""
    _token_hashes[(namespace, job)] = (uid, digest)


def token_matches(namespace: str, job: str, obj: dict[str, Any], presented: str) -> bool:
    """Whether `presented` is the job's token: its hash in the status or the one just issued.

    The operator writes the token Secret but never reads Secrets (RBAC: create and delete only).
    """
    digest = token_hash(presented)
    uid = str(obj["metadata"].get("uid", ""))
    known = [str((obj.get("status") or {}).get("reportTokenHash") or "")]
    issued = _token_hashes.get((namespace, job))
    if issued is not None and issued[0] == uid:
        known.append(issued[1])
    return any(k and hmac.compare_digest(k, digest) for k in known)


# --- the HTTP endpoint ---------------------------------------------------------------------------

KUBE: web.AppKey[Kube] = web.AppKey("kube", Kube)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def handle_report(request: web.Request) -> web.Response:
    namespace, job = request.match_info["namespace"], request.match_info["job"]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return _error(401, "a bearer token is required")
    kube = request.app[KUBE]
    try:
        obj = await kube.get("TrainingJob", namespace, job)
        # An unknown job and a wrong token look the same to a caller without the token.
        if obj is None or not token_matches(namespace, job, obj, token.strip()):
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
        async with job_lock(uid):
            try:
                status = TrainingJobStatus.model_validate(obj.get("status") or {})
            except ValidationError:
                status = TrainingJobStatus()
            overlay(uid, status)
            before = status.model_dump(include=URGENT_FIELDS)
            decision = apply_report(spec, status, report, datetime.now(UTC))
            # Progress alone is written at most every PATCH_MIN_SECONDS per job (every rank
            # reports); the reconciler writes what was held back on its next pass.
            urgent = status.model_dump(include=URGENT_FIELDS) != before
            if urgent or time.monotonic() - _last_patch.get(uid, -PATCH_MIN_SECONDS) >= PATCH_MIN_SECONDS:
                await kube.patch_status(
                    "TrainingJob",
                    namespace,
                    job,
                    status.model_dump(mode="json", by_alias=True, include=set(REPORT_FIELDS)),
                )
                _last_patch[uid] = time.monotonic()
            remember(uid, status)
    except KubeError as error:
        log.warning("report for %s/%s: %s", namespace, job, error)
        return _error(502, f"the API server refused: {error}")
    ack = TrainerReportAck(checkpoint_interval_seconds=status.checkpoint_interval, reason=decision.reason)
    return web.json_response(text=ack.model_dump_json())


def make_app(kube: Kube) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app[KUBE] = kube
    app.router.add_post(report_path("{namespace}", "{job}"), handle_report)
    return app


async def start(kube: Kube, port: int = REPORT_PORT, host: str = "0.0.0.0") -> web.AppRunner:
    """Serve the endpoint on `host:port` (every interface: workers reach it through a Service)."""
    runner = web.AppRunner(make_app(kube), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("trainer report endpoint on %s:%d", host, port)
    return runner


async def stop(runner: web.AppRunner) -> None:
    await runner.cleanup()
