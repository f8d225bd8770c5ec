"""The client SDK an FL client process runs: enrol, fetch the task and global model, train, upload.

    token = enrol(url, enrolment_token, "phone-17", labels={"region": "eu"}, ca_file=ca,
                  credential_file=Path("~/.ampacity/phone-17.token").expanduser())
    client = FederatedClient(url, token, ca_file=ca)
    while True:
        client.run_once(train)      # train(params, task) -> TrainResult
        time.sleep(poll_s)

The client generates its own token and enrols with its SHA-256, so the token never travels before
it is used and no one holding the population's enrolment token can take over an enrolled id.
`credential_file` keeps the token across restarts: enrolling again with it gets the same identity.
HTTPS is verified against `ca_file` (the CA certificate from the round's Secret); plain `http://`
URLs work only where the aggregator was started without TLS on purpose.

Uploads carry the *delta* from the model version the client started from, with its sample count as
the weight and its measured time per local step, which the controller feeds to the FedCompass speed
estimator.
"""

from __future__ import annotations

import hashlib
import secrets
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from ampacity.federated import tls
from ampacity.federated.aggregator import Arrays, atomic_write, decode_arrays, encode_arrays
from ampacity.federated.wire import (
    ACCURACY_HEADER,
    BASE_VERSION_HEADER,
    CLIENT_HEADER,
    ELAPSED_HEADER,
    ROUND_HEADER,
    STEPS_HEADER,
    VERSION_HEADER,
    WEIGHT_HEADER,
    EnrolRequest,
    EnrolResponse,
    Task,
)


@dataclass(frozen=True)
class TrainResult:
    """What a local training function returns: the trained parameters and how many samples it saw."""

    params: Mapping[str, npt.NDArray[np.generic]]
    num_samples: int
    #: The client's own evaluation, if it made one (reported in the round's status).
    accuracy: float | None = None


@dataclass(frozen=True)
class UploadResult:
    """The aggregator's answer: HTTP status and its JSON body (`status` or `error`)."""

    status_code: int
    body: dict[str, Any]

    @property
    def accepted(self) -> bool:
        return self.status_code == 202 and self.body.get("status") == "accepted"


TrainFn = Callable[[Arrays, Task], TrainResult]


class AggregatorError(RuntimeError):
    """The aggregator answered with an error status."""


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        try:
            reason = resp.json().get("error", resp.text)
        except ValueError:
            reason = resp.text
        raise AggregatorError(f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {reason}")


def _verify(ca_file: Path | None) -> ssl.SSLContext | bool:
    return tls.client_context(ca_file) if ca_file is not None else True


def _sni(server_name: str | None) -> dict[str, Any]:
    """`server_name`: the certificate's name when the URL's host is another (a port-forward)."""
    return {"sni_hostname": server_name} if server_name else {}


def load_or_create_token(credential_file: Path | None) -> str:
    """The client's token: read from `credential_file`, or generated (and saved there first)."""
    if credential_file is not None and credential_file.is_file():
        return credential_file.read_text().strip()
    token = secrets.token_urlsafe(32)
    if credential_file is not None:
        # Saved before it is enrolled: a crash in between re-enrols with the same token.
        atomic_write(credential_file, token.encode())
        credential_file.chmod(0o600)
    return token


def enrol(
    base_url: str,
    enrolment_token: str,
    client_id: str,
    labels: Mapping[str, str] | None = None,
    seconds_per_step: float | None = None,
    *,
    ca_file: Path | None = None,
    server_name: str | None = None,
    credential_file: Path | None = None,
    token: str | None = None,
) -> str:
    """Enrol `client_id` with the population's enrolment token; returns the client's own token.

    Idempotent: with the same `credential_file` (or `token`) a second enrolment keeps the
    identity; the aggregator refuses (409) an id enrolled with another credential.
    """
    own_token = token or load_or_create_token(credential_file)
    request = EnrolRequest(
        client_id=client_id,
        labels=dict(labels or {}),
        seconds_per_step=seconds_per_step,
        token_sha256=hashlib.sha256(own_token.encode()).hexdigest(),
    )
    with httpx.Client(base_url=base_url, timeout=30, verify=_verify(ca_file)) as http:
        resp = http.post(
            "/v1/clients",
            content=request.model_dump_json(),
            headers={"Authorization": f"Bearer {enrolment_token}", "Content-Type": "application/json"},
            extensions=_sni(server_name),
        )
    _raise_for(resp)
    EnrolResponse.model_validate_json(resp.content)
    return own_token


def register(
    base_url: str,
    admin_token: str,
    client_id: str,
    labels: Mapping[str, str] | None = None,
    seconds_per_step: float | None = None,
    *,
    ca_file: Path | None = None,
) -> str:
    """Enrol `client_id` as the admin (the aggregator generates the token); returns the token.

    For the operator's own tooling (an intermediate aggregator enrolling at its parent); clients
    enrol themselves with `enrol`.
    """
    request = EnrolRequest(client_id=client_id, labels=dict(labels or {}), seconds_per_step=seconds_per_step)
    with httpx.Client(base_url=base_url, timeout=30, verify=_verify(ca_file)) as http:
        resp = http.post(
            "/v1/clients",
            content=request.model_dump_json(exclude_none=True),
            headers={"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"},
        )
    _raise_for(resp)
    answer = EnrolResponse.model_validate_json(resp.content)
    if answer.token is None:
        raise AggregatorError(f"{client_id!r} was enrolled already; the aggregator kept its token")
    return answer.token


class FederatedClient:
    """One client's connection to its aggregator."""

    def __init__(
        self,
        base_url: str,
        token: str,
        timeout_s: float = 60.0,
        *,
        ca_file: Path | None = None,
        server_name: str | None = None,
    ) -> None:
        self._extensions = _sni(server_name)
        self.http = httpx.Client(
            base_url=base_url,
            timeout=timeout_s,
            headers={"Authorization": f"Bearer {token}"},
            verify=_verify(ca_file),
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FederatedClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def fetch_task(self) -> Task | None:
        """The open round's task for this client, or None if it has nothing to do now."""
        resp = self.http.get("/v1/task", extensions=self._extensions)
        _raise_for(resp)
        if resp.status_code == 204:
            return None
        return Task.model_validate_json(resp.content)

    def fetch_model(self) -> tuple[int, Arrays]:
        """The current global model and its version."""
        resp = self.http.get("/v1/model", extensions=self._extensions)
        _raise_for(resp)
        arrays, _ = decode_arrays(resp.content)
        return int(resp.headers[VERSION_HEADER]), arrays

    def upload(
        self,
        task: Task,
        delta: Mapping[str, npt.NDArray[np.generic]],
        weight: float,
        elapsed_s: float | None = None,
        *,
        client_id: str | None = None,
        accuracy: float | None = None,
    ) -> UploadResult:
        """Upload a delta for `task`; a refusal is returned (not raised) so the caller sees the reason."""
        headers = {
            ROUND_HEADER: task.round_id,
            BASE_VERSION_HEADER: str(task.model_version),
            WEIGHT_HEADER: repr(float(weight)),
            STEPS_HEADER: str(task.local_steps),
        }
        if elapsed_s is not None:
            headers[ELAPSED_HEADER] = repr(elapsed_s)
        if client_id is not None:
            headers[CLIENT_HEADER] = client_id
        if accuracy is not None:
            headers[ACCURACY_HEADER] = repr(float(accuracy))
        resp = self.http.post(
            "/v1/updates", content=encode_arrays(delta), headers=headers, extensions=self._extensions
        )
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text}
        return UploadResult(resp.status_code, body)

    def run_once(self, train: TrainFn) -> UploadResult | None:
        """Fetch the task (None if there is none), train from the global model, upload the delta."""
        task = self.fetch_task()
        if task is None:
            return None
        version, params = self.fetch_model()
        # The model may have moved on since the task was read; train from (and report) what we got.
        task = task.model_copy(update={"model_version": version})
        started = time.monotonic()
        result = train(params, task)
        elapsed = time.monotonic() - started
        delta = {k: (np.asarray(result.params[k]) - params[k]).astype(params[k].dtype) for k in params}
        return self.upload(task, delta, result.num_samples, elapsed, accuracy=result.accuracy)
