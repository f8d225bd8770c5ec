"""The FederatedRound controller's HTTP client for a round's aggregator service (admin API only).

Two failure kinds, because the controller reacts to them differently: `AggregatorUnavailable` (it
could not be reached, timed out or answered 5xx: try again on the next reconcile) and
`AggregatorRefused` (it answered 4xx: the request itself is wrong, with the aggregator's reason).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx

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


class AggregatorClient:
    """`async with AggregatorClient(url, admin_token) as agg: await agg.status()`."""

    def __init__(
        self,
        base_url: str,
        admin_token: str,
        timeout_s: float = TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout_s,
            headers={"Authorization": f"Bearer {admin_token}"},
            transport=transport,
        )

    async def __aenter__(self) -> AggregatorClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
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
        try:
            return response.json()
        except ValueError as error:
            raise AggregatorUnavailable(
                f"{method} {path}: answer is not JSON: {response.text[:200]}"
            ) from error

    async def status(self) -> dict[str, Any]:
        """GET /v1/status: model version, registered client ids, the current round record."""
        body: dict[str, Any] = await self._request("GET", "/v1/status")
        return body

    async def clients(self) -> dict[str, dict[str, Any]]:
        """GET /v1/clients: client id -> {labels, seconds_per_step}."""
        body: dict[str, dict[str, Any]] = await self._request("GET", "/v1/clients")
        return body

    async def open_round(self, round_spec: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/rounds: open a round; returns its record."""
        body: dict[str, Any] = await self._request("POST", "/v1/rounds", json=round_spec)
        return body

    async def close_round(self, round_id: str) -> dict[str, Any]:
        """POST /v1/rounds/{id}/close: aggregate now with whatever arrived."""
        body: dict[str, Any] = await self._request("POST", f"/v1/rounds/{round_id}/close")
        return body
