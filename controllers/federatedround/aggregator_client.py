"""The FederatedRound controller's HTTP client for a round's aggregator service (admin API only).

Bodies are the typed models of `ampacity.federated.wire`, the same the aggregator parses: an answer
that does not fit them is `AggregatorUnavailable` (the aggregator is not the one we speak to).

Two failure kinds, because the controller reacts to them differently: `AggregatorUnavailable` (it
could not be reached, timed out or answered 5xx: try again on the next reconcile) and
`AggregatorRefused` (it answered 4xx: the request itself is wrong, with the aggregator's reason).
"""

from __future__ import annotations

import functools
import ssl
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from ampacity.federated.wire import AggregatorStatus, ClientInfo, RoundRecord, RoundSpec

Model = TypeVar("Model", bound=BaseModel)
CLIENTS = TypeAdapter(dict[str, ClientInfo])

#: Per-request limit: a reconcile must not hang on an aggregator that accepts connections but stalls.
TIMEOUT_S = 5.0


class AggregatorUnavailable(RuntimeError):
    """The aggregator could not be reached or failed (connection error, timeout, 5xx)."""


class AggregatorRefused(RuntimeError):
    """The aggregator refused a request (4xx); `reason` is its `error` field."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


@functools.cache
def _default_tls() -> ssl.SSLContext:
    return ssl.create_default_context()


class AggregatorClient:
    """`async with AggregatorClient(url, admin_token) as agg: await agg.status()`."""

    def __init__(
        self,
        base_url: str,
        admin_token: str,
        timeout_s: float = TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,
        server_name: str | None = None,
    ) -> None:
        self.base_url = base_url
        # The TLS name to verify when the URL's host is not the certificate's (a port-forward).
        self._extensions = {"sni_hostname": server_name} if server_name else {}
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout_s,
            headers={"Authorization": f"Bearer {admin_token}"},
            transport=transport,
            # httpx builds (and loads the CA bundle into) a new context for `True` on every client:
            # milliseconds of CPU per poll of every round.
            verify=_default_tls() if verify is True else verify,
        )

    async def __aenter__(self) -> AggregatorClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> bytes:
        try:
            response = await self._http.request(method, path, extensions=self._extensions, **kwargs)
        except httpx.HTTPError as error:
            raise AggregatorUnavailable(
                f"{method} {self.base_url}{path}: {type(error).__name__}: {error}"
            ) from error
        if response.status_code >= 500:
            raise AggregatorUnavailable(f"{method} {path}: {response.status_code} {response.text[:200]}")
        if response.status_code >= 400:
            try:
                reason = str(response.json().get("error", response.text))
            except (ValueError, AttributeError):
                reason = response.text
            raise AggregatorRefused(response.status_code, reason)
        return response.content

    async def _typed(self, model: type[Model], method: str, path: str, **kwargs: Any) -> Model:
        content = await self._request(method, path, **kwargs)
        try:
            return model.model_validate_json(content)
        except ValidationError as error:
            raise AggregatorUnavailable(
                f"{method} {path}: answer does not fit the wire contract: {error}"
            ) from error

    async def status(self) -> AggregatorStatus:
        """GET /v1/status: model version, registered client ids, the current round record."""
        return await self._typed(AggregatorStatus, "GET", "/v1/status")

    async def clients(self) -> dict[str, ClientInfo]:
        """GET /v1/clients: client id -> labels, speed, revoked."""
        content = await self._request("GET", "/v1/clients")
        try:
            return CLIENTS.validate_json(content)
        except ValidationError as error:
            raise AggregatorUnavailable(
                f"GET /v1/clients: answer does not fit the wire contract: {error}"
            ) from error

    async def open_round(self, round_spec: RoundSpec) -> RoundRecord:
        """POST /v1/rounds: open a round; returns its record."""
        return await self._typed(
            RoundRecord,
            "POST",
            "/v1/rounds",
            content=round_spec.model_dump_json(),
            headers={"Content-Type": "application/json"},
        )

    async def close_round(self, round_id: str) -> RoundRecord:
        """POST /v1/rounds/{id}/close: aggregate now with whatever arrived."""
        return await self._typed(RoundRecord, "POST", f"/v1/rounds/{round_id}/close")
