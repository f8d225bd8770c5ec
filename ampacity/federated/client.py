"""The client SDK an FL client process runs: fetch the task and global model, train, upload the delta.

    token = register(url, admin_token, "phone-17", labels={"region": "eu"})
    client = FederatedClient(url, token)
    while True:
        client.run_once(train)      # train(params, task) -> TrainResult
        time.sleep(poll_s)

Uploads carry the *delta* from the model version the client started from, with its sample count as
the weight and its measured time per local step, which the controller feeds to the FedCompass speed
estimator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from ampacity.federated.aggregator import (
    BASE_VERSION_HEADER,
    ELAPSED_HEADER,
    ROUND_HEADER,
    STEPS_HEADER,
    VERSION_HEADER,
    WEIGHT_HEADER,
    Arrays,
    decode_arrays,
    encode_arrays,
)


@dataclass(frozen=True)
class Task:
    """The work the aggregator assigned this client for the open round."""

    round_id: str
    model_version: int
    local_steps: int
    deadline_unix_s: float | None


@dataclass(frozen=True)
class TrainResult:
    """What a local training function returns: the trained parameters and how many samples it saw."""

    params: Mapping[str, npt.NDArray[np.generic]]
    num_samples: int


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


def register(
    base_url: str,
    admin_token: str,
    client_id: str,
    labels: Mapping[str, str] | None = None,
    seconds_per_step: float | None = None,
    http: httpx.Client | None = None,
) -> str:
    """Register `client_id` with the aggregator and return its bearer token."""
    own = http is None
    session = http or httpx.Client(base_url=base_url, timeout=30)
    try:
        resp = session.post(
            "/v1/clients",
            json={"client_id": client_id, "labels": dict(labels or {}), "seconds_per_step": seconds_per_step},
            headers={"Authorization": f"Bearer {admin_token}"},
        )
        _raise_for(resp)
        token: str = resp.json()["token"]
        return token
    finally:
        if own:
            session.close()


class FederatedClient:
    """One client's connection to its aggregator."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 60.0) -> None:
        self.http = httpx.Client(
            base_url=base_url, timeout=timeout_s, headers={"Authorization": f"Bearer {token}"}
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FederatedClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def fetch_task(self) -> Task | None:
        """The open round's task for this client, or None if it has nothing to do now."""
        resp = self.http.get("/v1/task")
        _raise_for(resp)
        if resp.status_code == 204:
            return None
        body = resp.json()
        return Task(
            body["round_id"], int(body["model_version"]), int(body["local_steps"]), body["deadline_unix_s"]
        )

    def fetch_model(self) -> tuple[int, Arrays]:
        """The current global model and its version."""
        resp = self.http.get("/v1/model")
        _raise_for(resp)
        arrays, _ = decode_arrays(resp.content)
        return int(resp.headers[VERSION_HEADER]), arrays

    def upload(
        self,
        task: Task,
        delta: Mapping[str, npt.NDArray[np.generic]],
        weight: float,
        elapsed_s: float | None = None,
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
        resp = self.http.post("/v1/updates", content=encode_arrays(delta), headers=headers)
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
        task = Task(task.round_id, version, task.local_steps, task.deadline_unix_s)
        started = time.monotonic()
        result = train(params, task)
        elapsed = time.monotonic() - started
        delta = {k: (np.asarray(result.params[k]) - params[k]).astype(params[k].dtype) for k in params}
        return self.upload(task, delta, result.num_samples, elapsed)
