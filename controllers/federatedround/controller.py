"""FederatedRound reconciler: run the round's aggregator, select the cohort, open the round, follow it.

Each FederatedRound gets an aggregator (`ampacity federated aggregator` in the operator's image) as a
Deployment and Service, and three Secrets the operator creates and never reads back (RBAC: create,
not get; a 409 means the Secret is there already):

- `<round>-aggregator-admin`: the admin token (derived from the operator key, `controllers.tokens`),
  mounted only into the aggregator; the operator recomputes it.
- `<round>-aggregator-enrolment`: the population's enrolment token and the CA certificate, for the
  clients: the token can only enrol a client (POST /v1/clients with the SHA-256 of the client's own
  token); it can neither open or close a round nor replace the model.
- `<round>-aggregator-tls`: the aggregator's key and a certificate for its Service names, issued
  from the operator's CA (AMPACITY_FL_CA_CERT_FILE / AMPACITY_FL_CA_KEY_FILE, mounted from the
  chart's CA Secret). No CA and no `spec.aggregator.insecureHTTP: true`: the round waits with
  `TLSUnavailable` rather than falling back to plain HTTP.

On every reconcile the controller reads the aggregator's state with the admin token and:

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
import ssl
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ampacity.api import FEDERATED_ROUND
from ampacity.api.federatedround import (
    MAX_HISTORY,
    MAX_REJECTIONS,
    ClientAssignment,
    FederatedRoundSpec,
    FederatedRoundStatus,
    RoundPhase,
    RoundProgress,
    RoundResult,
    Strategy,
    UpdateRejection,
)
from ampacity.api.meta import LABEL_PREFIX
from ampacity.federated import scheduler, speed, tls
from ampacity.federated.aggregation import Rule
from ampacity.federated.wire import ClientAssignment as WireAssignment
from ampacity.federated.wire import ClientInfo, RoundRecord, RoundSpec
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
#: The environment variable the aggregator reads the population's enrolment token from.
ENROLMENT_TOKEN_ENV = "AMPACITY_FL_ENROLMENT_TOKEN"
CA_KEY = "ca.crt"
TLS_DIR = "/tls"
#: The operator's CA for aggregator certificates (PEM files; the chart mounts them).
CA_CERT_FILE_ENV = "AMPACITY_FL_CA_CERT_FILE"
CA_KEY_FILE_ENV = "AMPACITY_FL_CA_KEY_FILE"
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


def enrolment_secret_name(round_name: str) -> str:
    return f"{round_name}-aggregator-enrolment"


def tls_secret_name(round_name: str) -> str:
    return f"{round_name}-aggregator-tls"


def service_names(round_name: str, namespace: str) -> list[str]:
    """The DNS names the aggregator's certificate is issued for."""
    svc = aggregator_name(round_name)
    return [f"{svc}.{namespace}.svc", f"{svc}.{namespace}.svc.cluster.local", f"{svc}.{namespace}", svc]


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
    insecure = spec.aggregator.insecure_http
    mounts: list[dict[str, Any]] = [{"name": "state", "mountPath": STATE_DIR}]
    if insecure:
        args.append("--insecure-http")
    else:
        args += [f"--tls-cert={TLS_DIR}/tls.crt", f"--tls-key={TLS_DIR}/tls.key"]
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    container = {
        "name": "aggregator",
        "image": OPERATOR_IMAGE,
        "args": args,
        "env": [
            {
                "name": ADMIN_TOKEN_ENV,
                "valueFrom": {"secretKeyRef": {"name": admin_secret_name(ctx.name), "key": ADMIN_TOKEN_KEY}},
            },
            {
                "name": ENROLMENT_TOKEN_ENV,
                "valueFrom": {
                    "secretKeyRef": {"name": enrolment_secret_name(ctx.name), "key": ADMIN_TOKEN_KEY}
                },
            },
        ],
        "ports": [{"name": port_name(insecure), "containerPort": AGGREGATOR_PORT}],
        "volumeMounts": mounts,
        "readinessProbe": {
            "httpGet": {
                "path": "/healthz",
                "port": port_name(insecure),
                "scheme": "HTTP" if insecure else "HTTPS",
            },
            "periodSeconds": 5,
        },
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
    volumes = [volume]
    if not insecure:
        volumes.append({"name": "tls", "secret": {"secretName": tls_secret_name(ctx.name)}})
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
                    "volumes": volumes,
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


def port_name(insecure_http: bool) -> str:
    """The aggregator's port is named for its scheme (the chart's PodMonitor scrapes either)."""
    return "http" if insecure_http else "https"


def aggregator_service(ctx: Context, spec: FederatedRoundSpec) -> dict[str, Any]:
    name = port_name(spec.aggregator.insecure_http)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.child_metadata(aggregator_name(ctx.name), "aggregator"),
        "spec": {
            "selector": ctx.child_labels("aggregator"),
            "ports": [{"name": name, "port": AGGREGATOR_PORT, "targetPort": name}],
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


def enrolment_secret(ctx: Context, token: str, ca_cert_pem: bytes | None) -> dict[str, Any]:
    data = {ADMIN_TOKEN_KEY: base64.b64encode(token.encode()).decode()}
    if ca_cert_pem is not None:
        data[CA_KEY] = base64.b64encode(ca_cert_pem).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": ctx.child_metadata(enrolment_secret_name(ctx.name), "enrolment"),
        "type": "Opaque",
        "data": data,
    }


def tls_secret(ctx: Context, issued: tls.KeyPair, ca_cert_pem: bytes) -> dict[str, Any]:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": ctx.child_metadata(tls_secret_name(ctx.name), "aggregator"),
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64(issued.cert_pem), "tls.key": b64(issued.key_pem), CA_KEY: b64(ca_cert_pem)},
    }


def service_url(round_name: str, namespace: str, insecure_http: bool = False) -> str:
    """The aggregator's URL inside the cluster: what clients and the status show."""
    scheme = "http" if insecure_http else "https"
    return f"{scheme}://{aggregator_name(round_name)}.{namespace}.svc:{AGGREGATOR_PORT}"


def operator_url(
    round_name: str,
    namespace: str,
    annotations: dict[str, str],
    override: str | None,
    insecure_http: bool = False,
) -> str:
    """The URL the operator itself uses: the Service, or the override template (see the module doc)."""
    if not override:
        return service_url(round_name, namespace, insecure_http)
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


def round_id(name: str, uid: str, index: int = 1) -> str:
    """The id of the run's `index`-th round at the aggregator: unique even for a recreated object."""
    base = f"{name}-{uid.replace('-', '')[:8]}" if uid else name
    return base if index == 1 else f"{base}-{index}"


def round_progress(index: int, record: RoundRecord, view: RoundView, now: datetime) -> RoundProgress:
    """What the run's status keeps of one finished round."""
    reported = [
        r.accuracy for c, r in record.reports.items() if c in record.accepted and r.accuracy is not None
    ]
    return RoundProgress(
        round=index,
        round_id=record.spec.round_id,
        phase=view.phase,
        model_version=view.result.model_version if view.result is not None else None,
        selected=len(view.selected),
        participants=view.received,
        stragglers=list(view.missing) + [c for c in view.selected if c in record.late],
        rejected_updates=view.rejected,
        accuracy=sum(reported) / len(reported) if reported else None,
        completion_time=now,
        message=view.message,
    )


def record_round(status: FederatedRoundStatus, progress: RoundProgress) -> None:
    """Add a finished round to the history once (a re-read of the same record changes nothing)."""
    if any(h.round == progress.round for h in status.history):
        return
    status.history = [*status.history, progress][-MAX_HISTORY:]
    status.completed_rounds = max(status.completed_rounds, progress.round)


def start_next_round(ctx: Context, status: FederatedRoundStatus, rounds: int) -> None:
    """Move the run on to its next round: the per-round fields start empty, the result stays."""
    finished = status.history[-1] if status.history else None
    status.current_round += 1
    status.phase = RoundPhase.SELECTING
    status.round_id = ""
    status.selected_clients = []
    status.assignments = []
    status.received_updates = status.late_updates = status.rejected_updates = 0
    status.rejections = []
    status.start_time = status.deadline_time = status.completion_time = None
    how = f"round {finished.round} {finished.phase.lower()}" if finished else "next round"
    ctx.set_ready(
        False, "NextRound", f"{how}; selecting clients for round {status.current_round} of {rounds}"
    )


def selection_seed(namespace: str, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{namespace}/{name}".encode()).digest()[:4], "big")


def speed_estimates(
    clients: dict[str, ClientInfo], last_round: RoundRecord | None
) -> dict[str, speed.SpeedEstimate]:
    """Each client's seconds per step: its registered benchmark, then what it measured last round."""
    estimates: dict[str, speed.SpeedEstimate] = {}
    for client_id, info in clients.items():
        registered = info.seconds_per_step
        if registered is not None and 0 < registered < math.inf:
            estimates[client_id] = speed.SpeedEstimate(client_id, float(registered))
    reports = last_round.reports if last_round is not None else {}
    for client_id, report in reports.items():
        if client_id not in clients:
            continue
        elapsed, steps = report.elapsed_s, report.local_steps
        if elapsed is None or steps is None:
            continue
        if 0 < elapsed < math.inf and 1 <= steps < math.inf:
            estimates[client_id] = speed.observe(estimates.get(client_id), client_id, elapsed, int(steps))
    return estimates


@dataclass(frozen=True)
class RoundPlan:
    """The round to open: its cohort, their assignments, and the body of POST /v1/rounds."""

    selected: tuple[str, ...]
    assignments: tuple[ClientAssignment, ...]
    body: RoundSpec


@dataclass(frozen=True)
class Waiting:
    """Why no round can be opened yet."""

    reason: str
    message: str


def plan_round(
    spec: FederatedRoundSpec,
    rid: str,
    clients: dict[str, ClientInfo],
    last_round: RoundRecord | None,
    round_index: int,
    seed: int,
) -> RoundPlan | Waiting:
    """Select the cohort and assign local steps, or say what is missing (revoked clients never count)."""
    infos = [
        scheduler.ClientInfo(cid, dict(info.labels))
        for cid, info in sorted(clients.items())
        if not info.revoked
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
    body = RoundSpec(
        round_id=rid,
        clients={a.client: WireAssignment(local_steps=a.local_steps) for a in assignments},
        rule=Rule(spec.aggregation.rule),
        byzantine=spec.aggregation.byzantine_clients,
        trim_fraction=spec.aggregation.trim_fraction,
        min_quorum=spec.min_quorum,
        deadline_seconds=spec.deadline,
        max_norm=spec.aggregation.max_update_norm,
        close_when_complete=True,
    )
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


def _time(unix_s: float | None) -> datetime | None:
    return None if unix_s is None else datetime.fromtimestamp(unix_s, UTC)


def view_round(record: RoundRecord) -> RoundView:
    """Map the aggregator's round record (GET /v1/status `round`) onto the FederatedRound's terms."""
    selected = tuple(sorted(record.spec.clients))
    accepted, late = record.accepted, record.late
    phase = AGGREGATOR_PHASES[record.phase]
    result = None
    raw = record.result
    if phase == RoundPhase.COMPLETED and raw is not None:
        result = RoundResult(
            model_version=raw.version,
            updates=raw.accepted,
            late_included=raw.late_included,
            rule=raw.rule,
            update_norm=raw.update_norm,
            total_weight=raw.weight,
        )
    return RoundView(
        phase=phase,
        selected=selected,
        received=len(accepted),
        late=len(late),
        rejected=len(record.rejected),
        rejections=tuple(
            UpdateRejection(client=r.client_id, reason=r.reason) for r in record.rejected[-MAX_REJECTIONS:]
        ),
        start_time=_time(record.opened_unix_s),
        deadline_time=_time(record.deadline_unix_s),
        deadline_unix_s=record.deadline_unix_s,
        message=record.message,
        result=result,
        missing=tuple(c for c in selected if c not in accepted and c not in late),
    )


def adopted_assignments(record: RoundRecord) -> list[ClientAssignment]:
    """The assignments of a round found open at the aggregator (speeds are not recorded there)."""
    return [
        ClientAssignment(client=c, local_steps=a.local_steps) for c, a in sorted(record.spec.clients.items())
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


def enrolment_token(ctx: Context) -> str:
    """The population's enrolment token: lets a client enrol, nothing else."""
    return derive_token("aggregator-enrolment", str(ctx.body.metadata.uid))


class OperatorCAError(RuntimeError):
    """The operator's CA for aggregator certificates is not configured or cannot be read."""


def operator_ca() -> tls.KeyPair:
    """The CA the operator issues aggregator certificates from (files the chart mounts)."""
    cert_file, key_file = os.environ.get(CA_CERT_FILE_ENV), os.environ.get(CA_KEY_FILE_ENV)
    if not cert_file or not key_file:
        raise OperatorCAError(
            f"the operator has no CA for aggregator certificates ({CA_CERT_FILE_ENV} and {CA_KEY_FILE_ENV}"
            " unset); install the chart with its federated CA, or set spec.aggregator.insecureHTTP: true"
            " to serve plain HTTP on purpose"
        )
    try:
        return tls.KeyPair(Path(cert_file).read_bytes(), Path(key_file).read_bytes())
    except OSError as error:
        raise OperatorCAError(f"cannot read the operator's CA: {error}") from error


def operator_verify(insecure_http: bool) -> ssl.SSLContext | bool:
    """How the operator verifies its aggregators: against its own CA certificate."""
    if insecure_http:
        return True  # unused for http:// URLs
    cert_file = os.environ.get(CA_CERT_FILE_ENV)
    if not cert_file:
        raise OperatorCAError(f"{CA_CERT_FILE_ENV} is unset: the operator cannot verify its aggregators")
    try:
        return tls.client_context(Path(cert_file))
    except (OSError, ssl.SSLError) as error:
        raise OperatorCAError(f"cannot load the operator's CA certificate {cert_file}: {error}") from error


async def create_once(ctx: Context, manifest: dict[str, Any]) -> None:
    """Create a Secret unless it is there already; the operator never reads Secrets back."""
    try:
        await ctx.kube.create(manifest)
    except KubeError as error:
        if error.status != 409:
            raise


#: Per-object memo: (uid, monotonic time) of the round whose Secrets were last made sure of.
SECRETS_MEMO = "secrets_ensured"
#: While the aggregator is not available, its Secrets are made sure of again this often (one may
#: have been deleted by hand, and the aggregator cannot start without it).
SECRETS_RECHECK_SECONDS = 600.0


async def ensure_secrets(ctx: Context, spec: FederatedRoundSpec, available: bool) -> str:
    """The admin, enrolment and (unless insecureHTTP) TLS Secrets; returns the admin token.

    Once per round and operator process, and again every SECRETS_RECHECK_SECONDS while the
    aggregator is not available: the operator never reads Secrets back, so a create that answers
    409 is the only check there is, and repeating it on every poll cost three requests and a TLS
    key each time. The TLS key is generated here and written once: the 409 of a second
    create means the aggregator already has its key, and a new one is never sent (nor the old one
    read).
    """
    token = admin_token(ctx)
    uid = str(ctx.body.metadata.uid)
    ensured_uid, ensured_at = ctx.memo.get(SECRETS_MEMO, ("", 0.0))
    if ensured_uid == uid and (available or time.monotonic() - ensured_at < SECRETS_RECHECK_SECONDS):
        return token
    ca = None if spec.aggregator.insecure_http else operator_ca()
    await create_once(ctx, admin_secret(ctx, token))
    await create_once(ctx, enrolment_secret(ctx, enrolment_token(ctx), None if ca is None else ca.cert_pem))
    if ca is not None:
        issued = tls.issue_server_cert(ca, service_names(ctx.name, ctx.namespace))
        await create_once(ctx, tls_secret(ctx, issued, ca.cert_pem))
    ctx.memo[SECRETS_MEMO] = (uid, time.monotonic())
    return token


async def follow(ctx: Context, agg: AggregatorClient, uid: str) -> None:
    """One step of the run's lifecycle against its aggregator.

    A round that ends moves the run to the next one in its own step (the status is written before
    the next round is opened), so an operator restart in between neither skips nor repeats a round.
    """
    spec: FederatedRoundSpec = ctx.spec
    status: FederatedRoundStatus = ctx.status
    now = datetime.now(UTC)
    rid = round_id(ctx.name, uid, status.current_round)
    state = await agg.status()
    record = state.round
    if record is not None and record.spec.round_id == rid:
        if not status.assignments:
            # Opened by an operator that stopped before it could record the round: adopt it.
            status.round_id = rid
            status.assignments = adopted_assignments(record)
        view = view_round(record)
        if should_close(view, time.time()):
            record = await agg.close_round(rid)
            view = view_round(record)
        apply_view(ctx, status, view, status.aggregator, now)
        if view.phase in TERMINAL:
            record_round(status, round_progress(status.current_round, record, view, now))
            if status.current_round < spec.rounds:
                start_next_round(ctx, status, spec.rounds)
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
    if record is not None and record.phase in ("Training", "Aggregating"):
        other = record.spec.round_id
        status.phase = RoundPhase.PENDING
        ctx.set_ready(False, "AggregatorBusy", f"the aggregator is still running round {other}")
        return
    plan = plan_round(
        spec,
        rid,
        await agg.clients(),
        record,
        state.version,
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


async def remove_aggregator(ctx: Context, spec: FederatedRoundSpec, status: FederatedRoundStatus) -> None:
    """Once the run ended and no late update can come, delete its aggregator (not its state volume).

    Only where a stateVolumeClaim holds the final model: on an emptyDir the aggregator holds the only
    copy, so it stays and serves status.result.
    """
    claim = spec.aggregator.state_volume_claim
    if status.aggregator_removed or not claim or status.result_metrics is None:
        return
    for kind in ("Deployment", "Service"):
        await ctx.kube.delete(kind, ctx.namespace, aggregator_name(ctx.name))
    status.aggregator_removed = True
    version = status.result_metrics.model_version
    status.result = f"file://{STATE_DIR}/models/global-v{version}.npz"
    ctx.event(
        "AggregatorRemoved",
        f"the run ended; its aggregator is removed, the model (version {version}) stays on the"
        f" volume claim {claim} as {status.result}",
    )


async def reconcile(ctx: Context) -> None:
    spec: FederatedRoundSpec = ctx.spec
    status: FederatedRoundStatus = ctx.status
    now = datetime.now(UTC)
    ended = status.phase in TERMINAL
    available = True
    if ended:
        if not follow_after_end(status, spec, now):
            await remove_aggregator(ctx, spec, status)
            return
        token = admin_token(ctx)
    else:
        if not spec.aggregator.insecure_http:
            try:
                operator_ca()  # before the Deployment: without its certificate it could never start
            except OperatorCAError as error:
                ctx.set_ready(False, "TLSUnavailable", str(error))
                return
        deployment = await ctx.apply(aggregator_deployment(ctx, spec))
        await ctx.apply(aggregator_service(ctx, spec))
        available = deployment.get("status", {}).get("availableReplicas", 0) >= 1
        token = await ensure_secrets(ctx, spec, available)
    # The aggregator's state is polled (an ended round's too: a selected client may still deliver
    # late); an aggregator not yet available is not (its Deployment's change wakes this round),
    # unless the operator reaches it by another way (the override).
    polled = ended or available or bool(os.environ.get(URL_OVERRIDE_ENV))
    insecure = spec.aggregator.insecure_http
    status.aggregator = service_url(ctx.name, ctx.namespace, insecure)
    metrics.FEDERATED_ROUND_RECEIVED.labels(ctx.namespace, ctx.name).set(status.received_updates)
    annotations = dict(ctx.body.metadata.annotations or {})
    try:
        url = operator_url(ctx.name, ctx.namespace, annotations, os.environ.get(URL_OVERRIDE_ENV), insecure)
    except ValueError as error:
        if not ended:
            ctx.set_ready(False, "InvalidAggregatorURL", str(error))
        return
    try:
        verify = operator_verify(insecure)
    except OperatorCAError as error:
        if not ended:
            ctx.set_ready(False, "TLSUnavailable", str(error))
        return
    try:
        # The certificate names the Service: through an override URL the TLS name is still the Service's.
        server_name = f"{aggregator_name(ctx.name)}.{ctx.namespace}.svc"
        async with AggregatorClient(url, token, verify=verify, server_name=server_name) as agg:
            await follow(ctx, agg, str(ctx.body.metadata.uid or ""))
        ctx.memo.pop(UNREACHABLE_MEMO, None)
    except AggregatorRefused as error:
        # 401 most likely: the aggregator runs with another admin token than the round's Secret.
        if not ended:
            ctx.set_ready(
                False, "AggregatorRefused", f"the aggregator at {url} refused the operator: {error}"
            )
    except AggregatorUnavailable as error:
        ctx.memo[UNREACHABLE_MEMO] = ctx.memo.get(UNREACHABLE_MEMO, 0) + 1
        if ended:
            ctx.requeue(poll_seconds(ctx.memo[UNREACHABLE_MEMO]))
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
    if polled:
        ctx.requeue(poll_seconds(ctx.memo.get(UNREACHABLE_MEMO, 0)))


#: Per-object memo: polls in a row that could not reach the aggregator.
UNREACHABLE_MEMO = "aggregator_unreachable"
#: An aggregator that does not answer is polled less and less often, down to this.
UNREACHABLE_POLL_MAX_S = 60.0


def poll_seconds(unreachable: int) -> float:
    """POLL_INTERVAL_S, doubling with each poll in a row that could not reach the aggregator (up to
    UNREACHABLE_POLL_MAX_S): many rounds whose aggregators are down do not keep the operator busy."""
    return float(
        min(POLL_INTERVAL_S * 2 ** min(unreachable, 10), max(POLL_INTERVAL_S, UNREACHABLE_POLL_MAX_S))
    )


controller(FEDERATED_ROUND, reconcile)
