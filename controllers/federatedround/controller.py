"""FederatedRound reconciler: run the round's aggregator, select the cohort, open the round, follow it.

Each FederatedRound gets an aggregator (`ampacity federated aggregator` in the operator's image) as a
Deployment and Service, with an admin token (derived from the operator key, `controllers.tokens`)
in the Secret `<round>-aggregator-admin`. Clients register with the aggregator (POST /v1/clients,
with labels and their measured seconds per step). On every reconcile the controller reads the
aggregator's state with the admin token and:

- Pending/Selecting: waits until `cohortSize` registered clients match `clientSelector`, selects the
  cohort (`scheduler.select_cohort`: uniform, reproducible), assigns each client its local steps
  (fedcompass: `scheduler.initial_assignments` from the speed estimates, shortened where needed so
  the trip fits the deadline; fedavg and fedbuff: Q_max for everyone) and opens the round
  (POST /v1/rounds) with the quorum, deadline and aggregation rule.
- Training/Aggregating/Completed/Failed: copies the aggregator's record of the round into the
  status (received, late and rejected updates, rejection reasons, the result and its metrics).
  The aggregator closes the round itself when every selected client delivered or at the deadline;
  the controller closes it too if the deadline passed long ago (an aggregator restarted late).

Every decision is a pure function below (`plan_round`, `view_round`, ...); `reconcile` only does I/O.

The aggregator Deployment stays after the round ends: it serves the result (`status.result`) and
buffers late updates. Rounds must not share a `stateVolumeClaim` while both aggregators run.

Reaching the aggregator. In the cluster the operator uses the Service URL. An operator running
outside the cluster (tests, `ampacity demo`) sets `AMPACITY_AGGREGATOR_URL_OVERRIDE` to a URL
template; `{service}`, `{namespace}`, `{round}` and `{port}` are filled in, where `{port}` is the
round's `ampacity.dev/aggregator-port` annotation if set (e.g. the local end of a
`kubectl port-forward svc/<round>-aggregator <port>:8443`) and the Service port otherwise, e.g.
`AMPACITY_AGGREGATOR_URL_OVERRIDE='http://127.0.0.1:{port}'`. The annotation is read only when the
override is set, so in a cluster no user can point the operator (and its admin token) elsewhere.
`AMPACITY_FEDERATED_POLL_SECONDS` (default 5) sets how often a round is polled.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlparse

from ampacity.api import FEDERATED_ROUND
from ampacity.api.federatedround import (
    MAX_REJECTIONS,
    ClientAssignment,
    FederatedRoundSpec,
    FederatedRoundStatus,
    RoundPhase,
    RoundResult,
    Strategy,
    UpdateRejection,
)
from ampacity.api.meta import LABEL_PREFIX
from ampacity.federated import scheduler, speed
from ampacity.kube import KubeError
from controllers import metrics
from controllers.federatedround.aggregator_client import (
    AggregatorClient,
    AggregatorRefused,
    AggregatorUnavailable,
)
from controllers.reconciler import Context, controller
from controllers.tokens import derive_token

#: The operator's own image also runs the aggregator service.
OPERATOR_IMAGE = os.environ.get("AMPACITY_IMAGE", "ghcr.io/ampacity/ampacity:0.1.0")
AGGREGATOR_PORT = 8443
STATE_DIR = "/state"
ADMIN_TOKEN_KEY = "token"
#: The environment variable the aggregator reads its admin token from (`ampacity.federated.cli`).
ADMIN_TOKEN_ENV = "AMPACITY_FL_ADMIN_TOKEN"
URL_OVERRIDE_ENV = "AMPACITY_AGGREGATOR_URL_OVERRIDE"
PORT_ANNOTATION = f"{LABEL_PREFIX}/aggregator-port"
#: The round is polled this often (AMPACITY_FEDERATED_POLL_SECONDS, default 5): phases change within
#: seconds of an upload or the deadline. Each poll is one GET to the aggregator and one status patch.
POLL_INTERVAL_ENV = "AMPACITY_FEDERATED_POLL_SECONDS"
POLL_INTERVAL_S = float(os.environ.get(POLL_INTERVAL_ENV, "5"))
#: How long after the deadline the controller closes a round the aggregator left open.
CLOSE_GRACE_S = 10.0
#: After the round ends, its record is still followed for late updates for max(deadline, this).
LATE_WINDOW_MIN_S = 60.0
#: Speed assumed for a client that registered none, when no other client has one either.
DEFAULT_SECONDS_PER_STEP = 1.0

TERMINAL = (RoundPhase.COMPLETED, RoundPhase.FAILED)
AGGREGATOR_PHASES = {
    "Training": RoundPhase.TRAINING,
    "Aggregating": RoundPhase.AGGREGATING,
    "Completed": RoundPhase.COMPLETED,
    "Failed": RoundPhase.FAILED,
}


# -- children -------------------------------------------------------------------------------------


def aggregator_name(round_name: str) -> str:
    return f"{round_name}-aggregator"


def admin_secret_name(round_name: str) -> str:
    return f"{round_name}-aggregator-admin"


def model_path(model: str) -> str | None:
    """The local path of a `file://` model URI (read by the aggregator at start), else None."""
    parsed = urlparse(model)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        return None
    return unquote(parsed.path) or None


def aggregator_deployment(ctx: Context, spec: FederatedRoundSpec) -> dict[str, Any]:
    labels = ctx.child_labels("aggregator")
    args = [
        "federated",
        "aggregator",
        "--host=0.0.0.0",
        f"--port={AGGREGATOR_PORT}",
        f"--state-dir={STATE_DIR}",
    ]
    initial = model_path(spec.model)
    if initial is not None:
        args.append(f"--initial-model={initial}")
    container = {
        "name": "aggregator",
        "image": OPERATOR_IMAGE,
        "args": args,
        "env": [
            {
                "name": ADMIN_TOKEN_ENV,
                "valueFrom": {"secretKeyRef": {"name": admin_secret_name(ctx.name), "key": ADMIN_TOKEN_KEY}},
            }
        ],
        "ports": [{"name": "http", "containerPort": AGGREGATOR_PORT}],
        "volumeMounts": [{"name": "state", "mountPath": STATE_DIR}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    claim = spec.aggregator.state_volume_claim
    volume: dict[str, Any] = (
        {"name": "state", "persistentVolumeClaim": {"claimName": claim}}
        if claim
        else {"name": "state", "emptyDir": {}}
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": ctx.child_metadata(aggregator_name(ctx.name), "aggregator"),
        "spec": {
            "replicas": 1,
            # One aggregator at a time: two would each accept half of the updates.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    "volumes": [volume],
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65532,
                        "fsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                },
            },
        },
    }


def aggregator_service(ctx: Context) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.child_metadata(aggregator_name(ctx.name), "aggregator"),
        "spec": {
            "selector": ctx.child_labels("aggregator"),
            "ports": [{"name": "http", "port": AGGREGATOR_PORT, "targetPort": "http"}],
        },
    }


def admin_secret(ctx: Context, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": ctx.child_metadata(admin_secret_name(ctx.name), "aggregator"),
        "type": "Opaque",
        "data": {ADMIN_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def service_url(round_name: str, namespace: str) -> str:
    """The aggregator's URL inside the cluster: what clients and the status show."""
    return f"http://{aggregator_name(round_name)}.{namespace}.svc:{AGGREGATOR_PORT}"


def operator_url(round_name: str, namespace: str, annotations: dict[str, str], override: str | None) -> str:
    """The URL the operator itself uses: the Service, or the override template (see the module doc)."""
    if not override:
        return service_url(round_name, namespace)
    port = annotations.get(PORT_ANNOTATION, "").strip() or str(AGGREGATOR_PORT)
    if not port.isdigit():
        raise ValueError(f"annotation {PORT_ANNOTATION} must be a port number, got {port!r}")
    try:
        url = override.format(
            service=aggregator_name(round_name), namespace=namespace, round=round_name, port=port
        )
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"{URL_OVERRIDE_ENV}={override!r} is not a template of {{service}}, {{namespace}}, {{round}}"
            f" and {{port}}: {error!r}"
        ) from error
    return url.rstrip("/")


# -- decisions (pure) -----------------------------------------------------------------------------


def round_id(name: str, uid: str) -> str:
    """The round's id at the aggregator: unique even when a round of the same name is recreated."""
    return f"{name}-{uid.replace('-', '')[:8]}" if uid else name


def selection_seed(namespace: str, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{namespace}/{name}".encode()).digest()[:4], "big")


def speed_estimates(
    clients: dict[str, dict[str, Any]], last_round: dict[str, Any] | None
) -> dict[str, speed.SpeedEstimate]:
    """Each client's seconds per step: its registered benchmark, then what it measured last round."""
    estimates: dict[str, speed.SpeedEstimate] = {}
    for client_id, info in clients.items():
        registered = info.get("seconds_per_step")
        if isinstance(registered, int | float) and 0 < registered < math.inf:
            estimates[client_id] = speed.SpeedEstimate(client_id, float(registered))
    reports = (last_round or {}).get("reports") or {}
    for client_id, report in reports.items():
        if client_id not in clients:
            continue
        elapsed, steps = report.get("elapsed_s"), report.get("local_steps")
        if not (isinstance(elapsed, int | float) and isinstance(steps, int | float)):
            continue
        if 0 < elapsed < math.inf and 1 <= steps < math.inf:
            estimates[client_id] = speed.observe(estimates.get(client_id), client_id, elapsed, int(steps))
    return estimates


@dataclass(frozen=True)
class RoundPlan:
    """The round to open: its cohort, their assignments, and the body of POST /v1/rounds."""

    selected: tuple[str, ...]
    assignments: tuple[ClientAssignment, ...]
    body: dict[str, Any]


@dataclass(frozen=True)
class Waiting:
    """Why no round can be opened yet."""

    reason: str
    message: str


def plan_round(
    spec: FederatedRoundSpec,
    rid: str,
    clients: dict[str, dict[str, Any]],
    last_round: dict[str, Any] | None,
    round_index: int,
    seed: int,
) -> RoundPlan | Waiting:
    """Select the cohort and assign local steps, or say what is missing."""
    infos = [
        scheduler.ClientInfo(cid, dict(info.get("labels") or {})) for cid, info in sorted(clients.items())
    ]
    selected = scheduler.select_cohort(infos, spec.cohort_size, round_index, seed, spec.client_selector)
    if len(selected) < spec.cohort_size:
        wanted = ",".join(f"{k}={v}" for k, v in sorted(spec.client_selector.items())) or "any labels"
        return Waiting(
            "AwaitingClients",
            f"{len(selected)} of {spec.cohort_size} clients registered with {wanted}; clients register"
            " with the aggregator (POST /v1/clients)",
        )
    estimates = speed_estimates({c: clients[c] for c in selected}, last_round)
    known = sorted(e.seconds_per_step for e in estimates.values())
    fallback = known[len(known) // 2] if known else DEFAULT_SECONDS_PER_STEP
    speeds = {c: estimates[c].seconds_per_step if c in estimates else fallback for c in selected}
    bounds = scheduler.StepBounds(spec.local_steps.min, spec.local_steps.max)
    if spec.strategy == Strategy.FEDCOMPASS:
        planned, _ = scheduler.initial_assignments(speeds, 0.0, bounds)
    else:
        planned = scheduler.synchronous_assignments(speeds, 0.0, bounds, spec.deadline)
    assignments = []
    for a in sorted(planned, key=lambda a: a.client_id):
        steps = a.local_steps
        if spec.strategy == Strategy.FEDCOMPASS:
            # The aggregator closes at one deadline: a group that would land after it is shortened,
            # never below Q_min, so that its members still arrive on time if they can.
            fits = math.floor(spec.deadline / (speeds[a.client_id] * scheduler.DEFAULT_LATENESS))
            steps = max(bounds.q_min, min(steps, fits))
        assignments.append(
            ClientAssignment(
                client=a.client_id,
                local_steps=steps,
                group=a.group_id,
                seconds_per_step=estimates[a.client_id].seconds_per_step if a.client_id in estimates else 0,
            )
        )
    body = {
        "round_id": rid,
        "clients": {a.client: {"local_steps": a.local_steps} for a in assignments},
        "rule": spec.aggregation.rule,
        "byzantine": spec.aggregation.byzantine_clients,
        "trim_fraction": spec.aggregation.trim_fraction,
        "min_quorum": spec.min_quorum,
        "deadline_seconds": spec.deadline,
        "max_norm": spec.aggregation.max_update_norm,
        "close_when_complete": True,
    }
    return RoundPlan(tuple(sorted(selected)), tuple(assignments), body)


@dataclass(frozen=True)
class RoundView:
    """The aggregator's record of one round, in the FederatedRound's terms."""

    phase: RoundPhase
    selected: tuple[str, ...]
    received: int
    late: int
    rejected: int
    rejections: tuple[UpdateRejection, ...]
    start_time: datetime | None
    deadline_time: datetime | None
    deadline_unix_s: float | None
    message: str
    result: RoundResult | None = None
    missing: tuple[str, ...] = field(default=())


def _time(unix_s: Any) -> datetime | None:
    return datetime.fromtimestamp(float(unix_s), UTC) if isinstance(unix_s, int | float) else None


def view_round(record: dict[str, Any]) -> RoundView:
    """Map the aggregator's round record (GET /v1/status `round`) onto the FederatedRound's terms."""
    spec = record.get("spec") or {}
    selected = tuple(sorted(spec.get("clients") or {}))
    accepted, late = list(record.get("accepted") or []), list(record.get("late") or [])
    rejected = [r for r in record.get("rejected") or [] if isinstance(r, dict)]
    phase = AGGREGATOR_PHASES.get(str(record.get("phase")), RoundPhase.TRAINING)
    result = None
    raw = record.get("result") or {}
    if phase == RoundPhase.COMPLETED and "version" in raw:
        result = RoundResult(
            model_version=int(raw["version"]),
            updates=int(raw.get("accepted", len(accepted))),
            late_included=int(raw.get("late_included", 0)),
            rule=str(raw.get("rule", "")),
            update_norm=float(raw.get("update_norm", 0.0)),
            total_weight=float(raw.get("weight", 0.0)),
        )
    return RoundView(
        phase=phase,
        selected=selected,
        received=len(accepted),
        late=len(late),
        rejected=len(rejected),
        rejections=tuple(
            UpdateRejection(client=str(r.get("client_id", "")), reason=str(r.get("reason", "")))
            for r in rejected[-MAX_REJECTIONS:]
        ),
        start_time=_time(record.get("opened_unix_s")),
        deadline_time=_time(record.get("deadline_unix_s")),
        deadline_unix_s=record.get("deadline_unix_s"),
        message=str(record.get("message") or ""),
        result=result,
        missing=tuple(c for c in selected if c not in accepted and c not in late),
    )


def adopted_assignments(record: dict[str, Any]) -> list[ClientAssignment]:
    """The assignments of a round found open at the aggregator (speeds are not recorded there)."""
    clients = (record.get("spec") or {}).get("clients") or {}
    return [
        ClientAssignment(client=c, local_steps=max(1, int((clients[c] or {}).get("local_steps", 1))))
        for c in sorted(clients)
    ]


def follow_after_end(status: FederatedRoundStatus, spec: FederatedRoundSpec, now: datetime) -> bool:
    """Whether an ended round is still worth polling: a selected client may yet deliver late."""
    if status.completion_time is None or not status.round_id:
        return False
    if status.received_updates + status.late_updates >= len(status.selected_clients):
        return False
    window = max(spec.deadline, LATE_WINDOW_MIN_S)
    return (now - status.completion_time).total_seconds() < window


def should_close(view: RoundView, now_unix_s: float) -> bool:
    """The aggregator closes at its deadline; the controller steps in only if it has not long after."""
    return (
        view.phase == RoundPhase.TRAINING
        and view.deadline_unix_s is not None
        and now_unix_s > view.deadline_unix_s + CLOSE_GRACE_S
    )


def apply_view(ctx: Context, status: FederatedRoundStatus, view: RoundView, url: str, now: datetime) -> None:
    """Copy a view into the status; queue Events for what changed; set Ready."""
    # Phase changes come with a new Ready reason, which the shared loop posts as an Event.
    fresh = min(view.rejected - status.rejected_updates, len(view.rejections))
    for rejection in view.rejections[len(view.rejections) - fresh :] if fresh > 0 else ():
        ctx.event(
            "UpdateRejected", f"update from {rejection.client} rejected: {rejection.reason}", warning=True
        )
    if view.late > status.late_updates:
        ctx.event(
            "LateUpdates",
            f"{view.late - status.late_updates} update(s) arrived after the deadline;"
            " buffered for the next round",
        )
    status.phase = view.phase
    status.selected_clients = list(view.selected)
    status.received_updates = view.received
    status.late_updates = view.late
    status.rejected_updates = view.rejected
    status.rejections = list(view.rejections)
    status.start_time = view.start_time or status.start_time
    status.deadline_time = view.deadline_time or status.deadline_time
    if view.phase in TERMINAL and status.completion_time is None:
        status.completion_time = now
    if view.result is not None:
        status.result = f"{url}/v1/model?version={view.result.model_version}"
        status.result_metrics = view.result
    delivered = f"{view.received} of {len(view.selected)} selected clients delivered"
    extras = [f"{n} {what}" for n, what in ((view.late, "late"), (view.rejected, "rejected")) if n]
    counts = delivered + (f" ({', '.join(extras)})" if extras else "")
    if view.phase == RoundPhase.COMPLETED:
        version = view.result.model_version if view.result else "?"
        ctx.set_ready(True, "RoundCompleted", f"{counts}; global model version {version}: {view.message}")
    elif view.phase == RoundPhase.FAILED:
        ctx.set_ready(False, "RoundFailed", f"{counts}: {view.message}")
    elif view.phase == RoundPhase.AGGREGATING:
        ctx.set_ready(False, "Aggregating", f"{counts}; aggregating")
    else:
        deadline = view.deadline_time.isoformat() if view.deadline_time else "none"
        ctx.set_ready(False, "Training", f"{counts}; deadline {deadline}")


# -- I/O ------------------------------------------------------------------------------------------


def admin_token(ctx: Context) -> str:
    """The round's aggregator admin token, derived from the operator key and the round's uid."""
    return derive_token("aggregator-admin", str(ctx.body.metadata.uid))


async def ensure_admin_secret(ctx: Context) -> str:
    """Write the admin token into the round's Secret unless it is there already; return the token."""
    token = admin_token(ctx)
    try:
        await ctx.kube.create(admin_secret(ctx, token))
    except KubeError as error:
        if error.status != 409:
            raise
    return token


async def follow(ctx: Context, agg: AggregatorClient, rid: str) -> None:
    """One step of the round's lifecycle against its aggregator."""
    spec: FederatedRoundSpec = ctx.spec
    status: FederatedRoundStatus = ctx.status
    now = datetime.now(UTC)
    state = await agg.status()
    record = state.get("round")
    if isinstance(record, dict) and (record.get("spec") or {}).get("round_id") == rid:
        if not status.assignments:
            # Opened by an operator that stopped before it could record the round: adopt it.
            status.round_id = rid
            status.assignments = adopted_assignments(record)
        view = view_round(record)
        if should_close(view, time.time()):
            record = await agg.close_round(rid)
            view = view_round(record)
        apply_view(ctx, status, view, status.aggregator, now)
        return
    if status.phase in TERMINAL:
        return  # the aggregator has moved on to another round; keep what was recorded
    if status.round_id == rid and status.phase in (RoundPhase.TRAINING, RoundPhase.AGGREGATING):
        status.phase = RoundPhase.FAILED
        status.completion_time = now
        ctx.set_ready(
            False,
            "AggregatorStateLost",
            f"the aggregator no longer knows round {rid} (its state directory was lost); received updates"
            " are gone: set spec.aggregator.stateVolumeClaim to keep them across rescheduling",
        )
        return
    if isinstance(record, dict) and record.get("phase") in ("Training", "Aggregating"):
        other = (record.get("spec") or {}).get("round_id")
        status.phase = RoundPhase.PENDING
        ctx.set_ready(False, "AggregatorBusy", f"the aggregator is still running round {other}")
        return
    plan = plan_round(
        spec,
        rid,
        await agg.clients(),
        record if isinstance(record, dict) else None,
        int(state.get("version", 0)),
        selection_seed(ctx.namespace, ctx.name),
    )
    if isinstance(plan, Waiting):
        status.phase = RoundPhase.SELECTING
        ctx.set_ready(False, plan.reason, plan.message)
        return
    status.phase = RoundPhase.SELECTING
    try:
        opened = await agg.open_round(plan.body)
    except AggregatorRefused as refused:
        if refused.status == 409 and "no global model" in refused.reason:
            where = (
                f"put the model at {spec.model} on the aggregator's state volume"
                if model_path(spec.model)
                else "install it with PUT /v1/model"
            )
            ctx.set_ready(False, "NoGlobalModel", f"the aggregator has no global model yet: {where}")
            return
        if refused.status == 409:
            ctx.set_ready(False, "AggregatorBusy", refused.reason)
            return
        status.phase = RoundPhase.FAILED
        status.completion_time = now
        ctx.set_ready(False, "RoundRejected", f"the aggregator refused to open the round: {refused.reason}")
        return
    status.round_id = rid
    status.assignments = list(plan.assignments)
    steps = ", ".join(f"{a.client}={a.local_steps}" for a in plan.assignments)
    ctx.event("RoundOpened", f"selected {len(plan.selected)} clients ({spec.strategy}); local steps: {steps}")
    apply_view(ctx, status, view_round(opened), status.aggregator, now)


async def reconcile(ctx: Context) -> None:
    spec: FederatedRoundSpec = ctx.spec
    status: FederatedRoundStatus = ctx.status
    now = datetime.now(UTC)
    ended = status.phase in TERMINAL
    available = True
    if ended:
        if not follow_after_end(status, spec, now):
            return
        token = admin_token(ctx)
    else:
        token = await ensure_admin_secret(ctx)
        deployment = await ctx.apply(aggregator_deployment(ctx, spec))
        await ctx.apply(aggregator_service(ctx))
        available = deployment.get("status", {}).get("availableReplicas", 0) >= 1
    status.aggregator = service_url(ctx.name, ctx.namespace)
    metrics.FEDERATED_ROUND_RECEIVED.labels(ctx.namespace, ctx.name).set(status.received_updates)
    annotations = dict(ctx.body.metadata.annotations or {})
    try:
        url = operator_url(ctx.name, ctx.namespace, annotations, os.environ.get(URL_OVERRIDE_ENV))
    except ValueError as error:
        if not ended:
            ctx.set_ready(False, "InvalidAggregatorURL", str(error))
        return
    try:
        async with AggregatorClient(url, token) as agg:
            await follow(ctx, agg, round_id(ctx.name, str(ctx.body.metadata.uid or "")))
    except AggregatorRefused as error:
        # 401 most likely: the aggregator runs with another admin token than the round's Secret.
        if not ended:
            ctx.set_ready(
                False, "AggregatorRefused", f"the aggregator at {url} refused the operator: {error}"
            )
    except AggregatorUnavailable as error:
        if ended:
            return
        if status.phase == RoundPhase.PENDING and not available:
            ctx.set_ready(
                False, "AggregatorStarting", f"waiting for the aggregator to become available: {error}"
            )
        else:
            ctx.set_ready(False, "AggregatorUnreachable", f"cannot reach the aggregator at {url}: {error}")
    metrics.FEDERATED_ROUND_RECEIVED.labels(ctx.namespace, ctx.name).set(status.received_updates)
    is_open = status.phase in (RoundPhase.TRAINING, RoundPhase.AGGREGATING)
    metrics.FEDERATED_ROUND_OPEN.labels(ctx.namespace, ctx.name).set(1 if is_open else 0)
    if status.deadline_time is not None:
        metrics.FEDERATED_ROUND_DEADLINE.labels(ctx.namespace, ctx.name).set(status.deadline_time.timestamp())


controller(FEDERATED_ROUND, reconcile, interval=POLL_INTERVAL_S)
