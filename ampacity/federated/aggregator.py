"""The aggregator service: receives client updates over HTTP, aggregates them, writes the global model.

One process serves one federation and at most one open round at a time. The wire contract is
`ampacity.federated.wire`. Three credentials, each good for its own role only:

- the *admin* token (the operator's): open and close rounds, install the model (PUT /v1/model),
  list and revoke clients (DELETE /v1/clients/<id>), read the status;
- the *enrolment* token (one per population): enrol a client (POST /v1/clients) with the SHA-256
  of a token the client generated itself; nothing else;
- a *client* token: fetch its own task and the global model, upload one update per assignment as
  itself, refresh its own labels. It cannot touch the model, a round or another client's update.

An update is the model delta as an `.npz` whose names, shapes and dtypes match the global model;
anything else is refused with a reason and counted by kind (`ampacity_fl_rejected_updates_total`).

Durability. Every accepted update is written to `state_dir` (temp file, fsync, rename, fsync of the
directory) *before* it is acknowledged, and all round state lives in one `state.json` replaced the
same way, so a restart mid-round reloads every acknowledged update, and a crash during aggregation
leaves either the old or the new global model, never a mix.

Hierarchy (LIFL: Qi et al., "LIFL: A Lightweight, Event-driven Serverless Platform for Federated
Learning", MLSys 2024). With many clients, intermediate aggregators each take a share of them; an
intermediate started with `parent_url` fetches the global model from its parent when a round opens
and, when it closes, uploads its reduced update with the summed client weight as one weighted
update. For the mean this is exact (sum of weight x mean over children = the flat weighted sum); for
a robust rule the rule runs at the leaves and the root averages, which keeps the root's work
proportional to the number of intermediates rather than clients.

Late updates (after the round's deadline, for the round just closed) are kept and folded into the
next round with the FedCompass/FedBuff staleness weight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import json
import logging
import math
import os
import secrets
import ssl
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import numpy.typing as npt
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field, ValidationError

from ampacity.federated import aggregation, scheduler, tls
from ampacity.federated.wire import (
    ACCURACY_HEADER,
    BASE_VERSION_HEADER,
    CLIENT_HEADER,
    ELAPSED_HEADER,
    ROUND_HEADER,
    STEPS_HEADER,
    VERSION_HEADER,
    WEIGHT_HEADER,
    AggregateResult,
    AggregatorStatus,
    ClientInfo,
    EnrolRequest,
    EnrolResponse,
    Rejection,
    RoundRecord,
    RoundSpec,
    Task,
    UpdateReport,
    UploadAck,
)

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[np.generic]]

#: Why an update was refused: the `reason` label of `ampacity_fl_rejected_updates_total`.
REJECTION_KINDS = (
    "unauthorized",  # no valid client token, or a revoked one
    "wrong_client",  # the upload names another client than the token's
    "not_selected",  # the client is not in the round
    "duplicate",  # a second update for one assignment
    "unknown_round",
    "bad_headers",
    "too_large",
    "not_npz",
    "bad_weight",
    "bad_base_version",
    "invalid",  # any other refusal
    *aggregation.PROBLEMS,
)


@dataclass(frozen=True)
class AggregatorConfig:
    """How one aggregator process runs.

    `enrolment_token` lets clients enrol themselves (None: only the admin enrols clients).
    `parent_ca` (PEM file) verifies the parent aggregator's certificate (default: the system CAs).
    """

    state_dir: Path
    admin_token: str
    enrolment_token: str | None = None
    max_update_bytes: int = 64 * 1024 * 1024
    max_weight: float = 1e9
    parent_url: str | None = None
    parent_token: str | None = None
    parent_ca: Path | None = None
    deadline_poll_s: float = 0.2


class RegisteredClient(BaseModel):
    token_sha256: str
    labels: dict[str, str] = Field(default_factory=dict)
    seconds_per_step: float | None = None
    revoked: bool = False


class State(BaseModel):
    """Everything but the arrays: replaced atomically as a whole."""

    version: int = 0
    model_file: str | None = None
    round: RoundRecord | None = None
    # The round before `round`: a straggler's update for it is still buffered as late.
    previous_round: RoundRecord | None = None
    clients: dict[str, RegisteredClient] = Field(default_factory=dict)


class UpdateError(Exception):
    """A request refused with an HTTP status, a reason for the client and, for uploads, its kind."""

    def __init__(self, status: int, reason: str, kind: str = "invalid") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename is durable only once the directory entry is.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def encode_arrays(arrays: Mapping[str, npt.NDArray[Any]], meta: dict[str, Any] | None = None) -> bytes:
    """Arrays (and optional JSON metadata under `__meta__`) as `.npz` bytes."""
    buf = io.BytesIO()
    payload: dict[str, Any] = dict(arrays)
    if meta is not None:
        payload["__meta__"] = np.array(json.dumps(meta))
    np.savez(buf, **payload)
    return buf.getvalue()


class PayloadTooLarge(ValueError):
    """An `.npz` whose members inflate past the size limit."""


def decode_arrays(data: bytes, max_bytes: int | None = None) -> tuple[Arrays, dict[str, Any]]:
    """Parse `.npz` bytes without pickles, refusing members that inflate past `max_bytes`.

    The inflated size is checked from the zip directory before anything is decompressed, so a small
    compressed upload cannot expand into gigabytes (a zip bomb). `None` is for trusted sources: our
    own state directory and the parent aggregator.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
        if max_bytes is not None and inflated > max_bytes:
            raise PayloadTooLarge(f"payload inflates to {inflated} bytes, more than the limit {max_bytes}")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError:
        raise
    except Exception as exc:  # zipfile, numpy format and OS errors all mean "not a valid .npz"
        raise ValueError(f"payload is not a valid .npz archive: {exc}") from exc
    meta_raw = arrays.pop("__meta__", None)
    meta = json.loads(str(meta_raw)) if meta_raw is not None else {}
    return arrays, meta


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _error(status: int, reason: str, kind: str | None = None) -> web.Response:
    body: dict[str, str] = {"error": reason}
    if kind is not None:
        body["kind"] = kind
    return web.json_response(body, status=status)


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        text=model.model_dump_json(exclude_none=False), status=status, content_type="application/json"
    )


class Metrics:
    """The service's Prometheus series, on a registry the caller owns."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.updates = Counter(
            "ampacity_fl_updates", "Client updates by outcome.", ["result"], registry=registry
        )
        self.received_bytes = Counter(
            "ampacity_fl_received_bytes", "Bytes of update payloads received.", registry=registry
        )
        self.rounds = Counter("ampacity_fl_rounds", "Rounds closed, by phase.", ["phase"], registry=registry)
        self.model_version = Gauge(
            "ampacity_fl_global_model_version", "Version of the current global model.", registry=registry
        )
        self.rejected = Counter(
            "ampacity_fl_rejected_updates",
            "Client updates refused, by why (a REJECTION_KINDS value).",
            ["reason"],
            registry=registry,
        )
        self.enrolments = Counter(
            "ampacity_fl_enrolments",
            "Enrolment requests by outcome: created, existing (same identity again) or refused.",
            ["result"],
            registry=registry,
        )
        self.aggregation_seconds = Histogram(
            "ampacity_fl_aggregation_seconds", "Time to aggregate and persist a round.", registry=registry
        )
        for result in ("accepted", "rejected", "late"):
            self.updates.labels(result=result)
        for phase in ("completed", "failed"):
            self.rounds.labels(phase=phase)
        for kind in REJECTION_KINDS:
            self.rejected.labels(reason=kind)
        for outcome in ("created", "existing", "refused"):
            self.enrolments.labels(result=outcome)

    def reject(self, kind: str) -> None:
        self.updates.labels(result="rejected").inc()
        self.rejected.labels(reason=kind).inc()


class AggregatorService:
    """Round state and its persistence; the HTTP handlers in `create_app` are thin wrappers."""

    def __init__(self, config: AggregatorConfig, registry: CollectorRegistry) -> None:
        if not config.admin_token:
            raise ValueError("the aggregator needs an admin token")
        self.config = config
        self.metrics = Metrics(registry)
        self.lock = asyncio.Lock()
        self.root = config.state_dir
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = self._load_state()
        self.model: Arrays | None = self._load_model()
        self.updates: dict[str, tuple[Arrays, dict[str, Any]]] = {}
        self.late: dict[str, tuple[Arrays, dict[str, Any]]] = {}
        self._reload_updates()
        self.metrics.model_version.set(self.state.version)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- persistence -------------------------------------------------------------------------------

    def _state_path(self) -> Path:
        return self.root / "state.json"

    def _load_state(self) -> State:
        path = self._state_path()
        state = State.model_validate_json(path.read_bytes()) if path.exists() else State()
        if state.round is not None and state.round.phase == "Aggregating":
            # The crash came before the aggregate was committed (that write also marks the round
            # Completed), so the round is still open and can be closed again.
            state.round.phase = "Training"
        return state

    def _load_model(self) -> Arrays | None:
        if self.state.model_file is None:
            return None
        arrays, _ = decode_arrays((self.root / self.state.model_file).read_bytes())
        return arrays

    def _round_dir(self, round_id: str) -> Path:
        return self.root / "updates" / round_id

    def _reload_updates(self) -> None:
        """Reload what was acknowledged before a restart: the open round's updates and late ones."""
        record = self.state.round
        if record is not None and record.phase in ("Training", "Aggregating"):
            for name in record.accepted:
                path = self._round_dir(record.spec.round_id) / f"{name}.npz"
                self.updates[name] = decode_arrays(path.read_bytes())
        late_dir = self.root / "late"
        if late_dir.is_dir():
            for path in sorted(late_dir.glob("*.npz")):
                self.late[path.stem] = decode_arrays(path.read_bytes())

    async def _save_state(self) -> None:
        data = self.state.model_dump_json(indent=1).encode()
        await asyncio.to_thread(atomic_write, self._state_path(), data)

    def seed_model(self, arrays: Arrays) -> None:
        """Install version 0 before the service starts serving (no event loop needed)."""
        name = _model_name(0)
        atomic_write(self.root / name, encode_arrays(arrays))
        self.state.version, self.state.model_file, self.model = 0, name, arrays
        atomic_write(self._state_path(), self.state.model_dump_json(indent=1).encode())

    async def _install_model(
        self, arrays: Arrays, version: int, also: Callable[[], None] | None = None
    ) -> None:
        """Write the model file, then commit it, and whatever `also` changes, with one state write.

        The in-memory switch happens only once the model file is on disk and with no await in
        between, so a concurrent status or model request never sees a round Completed with the old
        model, nor a version whose file is missing.
        """
        name = _model_name(version)
        await asyncio.to_thread(atomic_write, self.root / name, encode_arrays(arrays))
        previous = self.state.model_file
        if also is not None:
            also()
        self.state.version = version
        self.state.model_file = name
        self.model = arrays
        self.metrics.model_version.set(version)
        await self._save_state()
        if previous is not None and previous != name:
            (self.root / previous).unlink(missing_ok=True)

    # -- clients and model -------------------------------------------------------------------------

    def is_admin(self, token: str) -> bool:
        return bool(token) and hmac.compare_digest(token, self.config.admin_token)

    def is_enrolment(self, token: str) -> bool:
        wanted = self.config.enrolment_token
        return bool(token) and wanted is not None and hmac.compare_digest(token, wanted)

    def client_for(self, token: str) -> str | None:
        """The enrolled, unrevoked client this bearer token belongs to."""
        if not token:
            return None
        # A dict lookup keyed by the token's digest: the attacker controls the token, not the digest.
        client_id = self._by_digest.get(_sha256(token))
        if client_id is None or self.state.clients[client_id].revoked:
            return None
        return client_id

    @property
    def _by_digest(self) -> dict[str, str]:
        return {c.token_sha256: cid for cid, c in self.state.clients.items()}

    async def enrol(
        self, request: EnrolRequest, caller: Literal["admin", "enrolment", "client"], as_client: str | None
    ) -> EnrolResponse:
        """Enrol a client, or recognise one enrolling again; raises UpdateError when refused.

        A client proves who it is by the token whose SHA-256 it enrolled with: enrolling again with
        the same one (or with that token as the bearer) keeps the identity and refreshes the labels
        and speed. Another credential for a taken id is refused, so an enrolment token cannot take
        over an enrolled client. Only the admin may re-key a client or enrol a revoked one again.
        """
        cid = request.client_id
        if caller == "client" and as_client != cid:
            raise UpdateError(403, f"this credential belongs to client {as_client!r}, not {cid!r}")
        async with self.lock:
            existing = self.state.clients.get(cid)
            same = existing is not None and (
                caller == "client"
                or (
                    request.token_sha256 is not None
                    and hmac.compare_digest(request.token_sha256, existing.token_sha256)
                )
            )
            if existing is not None and existing.revoked and caller != "admin":
                raise UpdateError(403, f"client {cid!r} was revoked; ask the federation's operator")
            if existing is not None and not same and caller != "admin":
                raise UpdateError(
                    409, f"client id {cid!r} is enrolled with another credential; pick another id"
                )
            token: str | None = None
            digest = request.token_sha256
            if existing is not None and same:
                digest = existing.token_sha256
            elif digest is None:
                if caller != "admin":
                    raise UpdateError(400, "token_sha256 is required: the SHA-256 of the token you generated")
                token = secrets.token_urlsafe(32)
                digest = _sha256(token)
            owner = self._by_digest.get(digest)
            if owner is not None and owner != cid:
                raise UpdateError(409, "that token is already another client's; generate a fresh one")
            self.state.clients[cid] = RegisteredClient(
                token_sha256=digest, labels=request.labels, seconds_per_step=request.seconds_per_step
            )
            await self._save_state()
        return EnrolResponse(client_id=cid, created=not (existing is not None and same), token=token)

    async def revoke(self, client_id: str) -> None:
        """Refuse the client's token from now on; its updates already accepted stay in the round."""
        async with self.lock:
            client = self.state.clients.get(client_id)
            if client is None:
                raise UpdateError(404, f"no client {client_id!r}")
            client.revoked = True
            await self._save_state()

    async def set_model(self, arrays: Arrays, version: int | None) -> int:
        async with self.lock:
            if self.state.round is not None and self.state.round.phase == "Training":
                raise UpdateError(409, "cannot replace the global model while a round is open")
            if version is None:
                version = 0 if self.model is None else self.state.version + 1
            await self._install_model(arrays, version)
            return version

    # -- rounds ------------------------------------------------------------------------------------

    async def open_round(self, spec: RoundSpec) -> RoundRecord:
        self._refuse_if_open()
        if self.config.parent_url is not None:
            # An intermediate trains on its parent's current model.
            arrays, version = await self._fetch_parent_model()
            async with self.lock:
                await self._install_model(arrays, version)
        async with self.lock:
            self._refuse_if_open()
            if self.model is None:
                raise UpdateError(409, "no global model: PUT /v1/model or start with --initial-model")
            unknown = sorted(set(spec.clients) - set(self.state.clients))
            if unknown:
                raise UpdateError(400, f"clients not registered: {unknown}")
            revoked = sorted(c for c in spec.clients if self.state.clients[c].revoked)
            if revoked:
                raise UpdateError(400, f"clients revoked: {revoked}")
            now = time.time()
            deadline = None if spec.deadline_seconds is None else now + spec.deadline_seconds
            record = RoundRecord(
                spec=spec, opened_unix_s=now, deadline_unix_s=deadline, base_version=self.state.version
            )
            self.state.previous_round = self.state.round
            self.state.round = record
            self.updates = {}
            await self._save_state()
            return record

    def _refuse_if_open(self) -> None:
        current = self.state.round
        if current is not None and current.phase in ("Training", "Aggregating"):
            raise UpdateError(409, f"round {current.spec.round_id!r} is still open")

    async def submit(
        self,
        client_id: str,
        round_id: str,
        base_version: int,
        weight: float,
        body: bytes,
        report: UpdateReport,
    ) -> UploadAck:
        """Validate, persist, then acknowledge one update; raises UpdateError with the reason."""
        self.metrics.received_bytes.inc(len(body))
        async with self.lock:
            record = next(
                (
                    r
                    for r in (self.state.round, self.state.previous_round)
                    if r and r.spec.round_id == round_id
                ),
                None,
            )
            if record is None:
                raise UpdateError(
                    409, f"round {round_id!r} is neither the current nor the previous round", "unknown_round"
                )
            if client_id not in record.spec.clients:
                raise UpdateError(
                    403, f"client {client_id!r} was not selected for round {round_id!r}", "not_selected"
                )
            if client_id in record.accepted or client_id in record.late:
                raise UpdateError(
                    409, f"client {client_id!r} already delivered an update for {round_id!r}", "duplicate"
                )
            try:
                arrays = self._check(record, weight, base_version, body)
            except UpdateError as exc:
                # Recorded on the round (status.rejectedUpdates) so that the controller sees it.
                record.rejected.append(Rejection(client_id=client_id, reason=exc.reason, kind=exc.kind))
                await self._save_state()
                raise
            meta = {"weight": weight, "base_version": base_version}
            past_deadline = record.deadline_unix_s is not None and time.time() > record.deadline_unix_s
            if record is not self.state.round or record.phase != "Training" or past_deadline:
                key = f"{round_id}.{client_id}"
                await asyncio.to_thread(
                    atomic_write, self.root / "late" / f"{key}.npz", encode_arrays(arrays, meta)
                )
                self.late[key] = (arrays, meta)
                record.late.append(client_id)
                record.reports[client_id] = report
                await self._save_state()
                self.metrics.updates.labels(result="late").inc()
                return UploadAck(status="late", round_id=round_id, message="buffered for the next round")
            path = self._round_dir(round_id) / f"{client_id}.npz"
            await asyncio.to_thread(atomic_write, path, encode_arrays(arrays, meta))
            self.updates[client_id] = (arrays, meta)
            record.accepted.append(client_id)
            record.reports[client_id] = report
            await self._save_state()
            self.metrics.updates.labels(result="accepted").inc()
            complete = record.spec.close_when_complete and set(record.accepted) == set(record.spec.clients)
        if complete:
            self._spawn(self.close_round(round_id, "all selected clients delivered"))
        return UploadAck(status="accepted", round_id=round_id, received=len(record.accepted))

    def _check(self, record: RoundRecord, weight: float, base_version: int, body: bytes) -> Arrays:
        """The update's arrays, or UpdateError with why they cannot be aggregated."""
        if not (math.isfinite(weight) and 0 < weight <= self.config.max_weight):
            raise UpdateError(
                400, f"weight must be in (0, {self.config.max_weight:g}], got {weight}", "bad_weight"
            )
        if base_version > self.state.version or base_version < 0:
            raise UpdateError(
                400,
                f"base version {base_version} is not a version this aggregator served",
                "bad_base_version",
            )
        try:
            arrays, _ = decode_arrays(body, self.config.max_update_bytes)
        except PayloadTooLarge as exc:
            raise UpdateError(413, str(exc), "too_large") from exc
        except ValueError as exc:
            raise UpdateError(400, str(exc), "not_npz") from exc
        assert self.model is not None
        problem = aggregation.check_update(arrays, self.model, record.spec.max_norm)
        if problem is not None:
            raise UpdateError(422, problem.reason, problem.kind)
        return arrays

    def _spawn(self, coro: Awaitable[Any]) -> None:
        async def runner() -> None:
            try:
                await coro
            except UpdateError as exc:
                log.info("background close: %s", exc.reason)

        task = asyncio.create_task(runner())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close_round(self, round_id: str, why: str) -> RoundRecord:
        """Aggregate the round's updates (plus buffered late ones) and install or forward the result."""
        async with self.lock:
            record = self.state.round
            if record is None or record.spec.round_id != round_id:
                raise UpdateError(404, f"no round {round_id!r}")
            if record.phase != "Training":
                return record
            record.phase = "Aggregating"
            await self._save_state()
            started = time.perf_counter()
            try:
                result, new_model = await self._aggregate(record)
            except (ValueError, httpx.HTTPError, UpdateError) as exc:
                record.phase = "Failed"
                record.message = exc.reason if isinstance(exc, UpdateError) else str(exc)
                await self._save_state()
                self.metrics.rounds.labels(phase="failed").inc()
            else:
                spent = sorted(self.late)

                def complete() -> None:
                    record.phase = "Completed"
                    record.message = why
                    record.result = result
                    self.late = {}

                if new_model is None:
                    complete()
                    await self._save_state()
                else:
                    await self._install_model(new_model, result.version, complete)
                self.metrics.rounds.labels(phase="completed").inc()
                # Only now, with the aggregate committed, are the buffered late updates spent.
                for key in spent:
                    await asyncio.to_thread((self.root / "late" / f"{key}.npz").unlink, True)
            self.metrics.aggregation_seconds.observe(time.perf_counter() - started)
            self.updates = {}
            await asyncio.to_thread(_remove_tree, self._round_dir(round_id))
            return record

    async def _aggregate(self, record: RoundRecord) -> tuple[AggregateResult, Arrays | None]:
        """The round's result, and the new global model (None when forwarded to a parent)."""
        spec = record.spec
        if not scheduler.quorum_met(len(self.updates), spec.min_quorum):
            raise ValueError(f"quorum not met: {len(self.updates)} of the required {spec.min_quorum} updates")
        assert self.model is not None
        entries = [(name, *self.updates[name]) for name in sorted(self.updates)]
        stale = [(f"late:{key}", *self.late[key]) for key in sorted(self.late)]
        vectors, weights = [], []
        for _, arrays, meta in entries + stale:
            staleness = self.state.version - int(meta["base_version"])
            vectors.append(aggregation.flatten(arrays))
            weights.append(
                float(meta["weight"]) * scheduler.staleness_weight(staleness, spec.staleness_exponent)
            )
        reduced = aggregation.aggregate(spec.rule, vectors, weights, spec.byzantine, spec.trim_fraction)
        delta = aggregation.unflatten(reduced, self.model)
        total_weight = float(sum(float(meta["weight"]) for _, _, meta in entries + stale))
        result = AggregateResult(
            accepted=len(entries),
            late_included=len(stale),
            rule=spec.rule.value,
            update_norm=float(np.linalg.norm(reduced)),
            weight=total_weight,
            version=self.state.version,
        )
        if self.config.parent_url is not None:
            await self._forward(spec.round_id, delta, total_weight)
            result.forwarded_to = self.config.parent_url
            return result, None
        new_model: Arrays = {
            k: (np.asarray(self.model[k], dtype=np.float64) + np.asarray(delta[k], dtype=np.float64)).astype(
                self.model[k].dtype
            )
            for k in self.model
        }
        result.version = self.state.version + 1
        result.model_file = _model_name(self.state.version + 1)
        return result, new_model

    def _parent_http(self) -> httpx.AsyncClient:
        assert self.config.parent_url is not None
        verify: ssl.SSLContext | bool = (
            tls.client_context(self.config.parent_ca) if self.config.parent_ca is not None else True
        )
        return httpx.AsyncClient(base_url=self.config.parent_url, timeout=60, verify=verify)

    async def _fetch_parent_model(self) -> tuple[Arrays, int]:
        assert self.config.parent_url is not None
        async with self._parent_http() as http:
            resp = await http.get(
                "/v1/model", headers={"Authorization": f"Bearer {self.config.parent_token}"}
            )
            resp.raise_for_status()
        arrays, _ = decode_arrays(resp.content)
        return arrays, int(resp.headers[VERSION_HEADER])

    async def _forward(self, round_id: str, delta: Arrays, weight: float) -> None:
        assert self.config.parent_url is not None
        headers = {
            "Authorization": f"Bearer {self.config.parent_token}",
            ROUND_HEADER: round_id,
            BASE_VERSION_HEADER: str(self.state.version),
            WEIGHT_HEADER: repr(weight),
        }
        async with self._parent_http() as http:
            resp = await http.post("/v1/updates", content=encode_arrays(delta), headers=headers)
        if resp.status_code >= 400:
            raise UpdateError(502, f"parent refused the partial aggregate: {resp.status_code} {resp.text}")

    async def check_deadline(self) -> None:
        """Close the open round once its deadline passes, whoever is still missing."""
        record = self.state.round
        if (
            record is not None
            and record.phase == "Training"
            and record.deadline_unix_s is not None
            and time.time() >= record.deadline_unix_s
        ):
            await self.close_round(record.spec.round_id, "deadline reached")

    def status(self) -> AggregatorStatus:
        return AggregatorStatus(
            version=self.state.version,
            clients=sorted(self.state.clients),
            round=self.state.round,
            late_buffered=sorted(self.late),
        )

    def task_for(self, client_id: str) -> Task | None:
        record = self.state.round
        if record is None or record.phase != "Training" or client_id not in record.spec.clients:
            return None
        if client_id in record.accepted or client_id in record.late:
            return None
        return Task(
            round_id=record.spec.round_id,
            model_version=self.state.version,
            local_steps=record.spec.clients[client_id].local_steps,
            deadline_unix_s=record.deadline_unix_s,
        )


def _first_error(exc: ValidationError) -> str:
    """A pydantic error in words: the field's dotted path and what is wrong with it."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}" + (
        f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    )


def _model_name(version: int) -> str:
    return f"models/global-v{version}.npz"


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVICE = web.AppKey("service", AggregatorService)


def create_app(config: AggregatorConfig, registry: CollectorRegistry) -> web.Application:
    """The aiohttp application; `registry` receives the metrics (one per app, so tests can run many)."""
    service = AggregatorService(config, registry)
    # aiohttp's own limit answers with plain text; keep it above ours so that ours (JSON) speaks first.
    app = web.Application(client_max_size=config.max_update_bytes + 1024 * 1024)
    app[SERVICE] = service

    def admin(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if not service.is_admin(_bearer(request)):
                return _error(401, "admin token required")
            return await handler(request)

        return wrapped

    async def json_body(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as exc:
            raise UpdateError(400, f"request body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise UpdateError(400, "request body must be a JSON object")
        return body

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except UpdateError as exc:
            return _error(exc.status, exc.reason)
        except web.HTTPRequestEntityTooLarge:
            service.metrics.reject("too_large")
            return _error(413, f"payload larger than {config.max_update_bytes} bytes", "too_large")

    app.middlewares.append(errors)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def enrol(request: web.Request) -> web.Response:
        # Admin, the population's enrolment token, or an enrolled client refreshing itself.
        token = _bearer(request)
        as_client = service.client_for(token)
        caller: Literal["admin", "enrolment", "client"]
        if service.is_admin(token):
            caller = "admin"
        elif as_client is not None:
            caller = "client"
        elif service.is_enrolment(token):
            caller = "enrolment"
        else:
            service.metrics.enrolments.labels(result="refused").inc()
            return _error(401, "an enrolment token, a client token or the admin token is required")
        try:
            enrolment = EnrolRequest.model_validate(await json_body(request))
        except ValidationError as exc:
            service.metrics.enrolments.labels(result="refused").inc()
            raise UpdateError(400, f"invalid enrolment: {_first_error(exc)}") from exc
        try:
            answer = await service.enrol(enrolment, caller, as_client)
        except UpdateError:
            service.metrics.enrolments.labels(result="refused").inc()
            raise
        service.metrics.enrolments.labels(result="created" if answer.created else "existing").inc()
        return _json(answer, 201 if answer.created else 200)

    async def list_clients(_: web.Request) -> web.Response:
        clients = {
            cid: ClientInfo(labels=c.labels, seconds_per_step=c.seconds_per_step, revoked=c.revoked)
            for cid, c in service.state.clients.items()
        }
        return web.json_response({cid: info.model_dump(mode="json") for cid, info in clients.items()})

    async def revoke_client(request: web.Request) -> web.Response:
        await service.revoke(request.match_info["client_id"])
        return web.Response(status=204)

    async def open_round(request: web.Request) -> web.Response:
        try:
            spec = RoundSpec.model_validate(await json_body(request))
        except ValidationError as exc:
            raise UpdateError(400, f"invalid round spec: {_first_error(exc)}") from exc
        record = await service.open_round(spec)
        return _json(record, 201)

    async def close_round(request: web.Request) -> web.Response:
        record = await service.close_round(request.match_info["round_id"], "closed by the controller")
        return _json(record)

    async def status(_: web.Request) -> web.Response:
        return _json(service.status())

    async def put_model(request: web.Request) -> web.Response:
        raw_version = request.headers.get(VERSION_HEADER)
        try:
            arrays, _ = decode_arrays(await request.read())  # the admin is trusted
            version = None if raw_version is None else int(raw_version)
        except ValueError as exc:
            raise UpdateError(400, str(exc)) from exc
        return web.json_response({"version": await service.set_model(arrays, version)})

    async def get_model(request: web.Request) -> web.Response:
        token = _bearer(request)
        if not (service.is_admin(token) or service.client_for(token)):
            return _error(401, "client or admin token required")
        if service.model is None or service.state.model_file is None:
            return _error(404, "no global model yet")
        wanted = request.query.get("version")
        if wanted is not None and wanted != str(service.state.version):
            # A pinned reference (a FederatedRound's status.result) must not silently get another model.
            return _error(404, f"model version {wanted} is not the current one ({service.state.version})")
        data = await asyncio.to_thread((service.root / service.state.model_file).read_bytes)
        return web.Response(
            body=data,
            content_type="application/octet-stream",
            headers={VERSION_HEADER: str(service.state.version)},
        )

    async def get_task(request: web.Request) -> web.Response:
        client_id = service.client_for(_bearer(request))
        if client_id is None:
            return _error(401, "unknown or revoked client token")
        task = service.task_for(client_id)
        return web.Response(status=204) if task is None else _json(task)

    async def post_update(request: web.Request) -> web.Response:
        # Every upload ends up counted once: accepted, late, or rejected (any refusal, 401 to 422).
        client_id = service.client_for(_bearer(request))
        if client_id is None:
            service.metrics.reject("unauthorized")
            return _error(401, "unknown or revoked client token", "unauthorized")
        try:
            named = request.headers.get(CLIENT_HEADER)
            if named is not None and named != client_id:
                raise UpdateError(
                    403, f"this credential belongs to client {client_id!r}, not {named!r}", "wrong_client"
                )
            if request.content_length is not None and request.content_length > config.max_update_bytes:
                raise UpdateError(413, f"payload larger than {config.max_update_bytes} bytes", "too_large")
            try:
                round_id = request.headers[ROUND_HEADER]
                base_version = int(request.headers[BASE_VERSION_HEADER])
                weight = float(request.headers.get(WEIGHT_HEADER, "1"))
            except (KeyError, ValueError) as exc:
                raise UpdateError(
                    400,
                    f"headers {ROUND_HEADER} and {BASE_VERSION_HEADER} (integer) are required: {exc}",
                    "bad_headers",
                ) from exc
            body = await request.read()
            if len(body) > config.max_update_bytes:
                raise UpdateError(413, f"payload larger than {config.max_update_bytes} bytes", "too_large")
            measured: dict[str, float] = {}
            for header, key in (
                (ELAPSED_HEADER, "elapsed_s"),
                (STEPS_HEADER, "local_steps"),
                (ACCURACY_HEADER, "accuracy"),
            ):
                if header in request.headers:
                    with contextlib.suppress(ValueError):
                        value = float(request.headers[header])
                        if math.isfinite(value):
                            measured[key] = value
            if not 0 <= measured.get("accuracy", 0) <= 1:
                del measured["accuracy"]
            report = UpdateReport.model_validate(measured)
            ack = await service.submit(client_id, round_id, base_version, weight, body, report)
        except UpdateError as exc:
            service.metrics.reject(exc.kind)
            log.info("update from %s refused (%s): %s", client_id, exc.kind, exc.reason)
            return _error(exc.status, exc.reason, exc.kind)
        return _json(ack, 202)

    async def deadline_watch(app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(config.deadline_poll_s)
                try:
                    await service.check_deadline()
                except Exception:  # keep watching: one failed close must not stop later rounds
                    log.exception("closing the round at its deadline failed")

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for pending in list(service._tasks):
            with contextlib.suppress(Exception):
                await pending

    app.cleanup_ctx.append(deadline_watch)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/clients", enrol)
    app.router.add_get("/v1/clients", admin(list_clients))
    app.router.add_delete("/v1/clients/{client_id}", admin(revoke_client))
    app.router.add_post("/v1/rounds", admin(open_round))
    app.router.add_post("/v1/rounds/{round_id}/close", admin(close_round))
    app.router.add_get("/v1/status", admin(status))
    app.router.add_put("/v1/model", admin(put_model))
    app.router.add_get("/v1/model", get_model)
    app.router.add_get("/v1/task", get_task)
    app.router.add_post("/v1/updates", post_update)
    return app


def run(
    config: AggregatorConfig,
    host: str = "0.0.0.0",
    port: int = 8470,
    initial_model: Path | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Serve (HTTPS with `ssl_context`) until interrupted; `initial_model` seeds an empty state directory.

    A missing `initial_model` is not fatal: the service starts without a model and refuses to open
    a round (409, "no global model") until one is PUT, so its controller can say what is missing
    instead of watching a crash loop.
    """
    app = create_app(config, CollectorRegistry())
    service = app[SERVICE]
    if initial_model is not None and service.model is None:
        if initial_model.is_file():
            service.seed_model(decode_arrays(initial_model.read_bytes())[0])
        else:
            log.warning("initial model %s not found; waiting for PUT /v1/model", initial_model)
    web.run_app(app, host=host, port=port, ssl_context=ssl_context)
