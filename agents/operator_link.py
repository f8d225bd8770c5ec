"""The agent's fast way to the operator's power runtime (`controllers.powerbudget.endpoint`).

Every round the agent POSTs its sample and gets its node's assignment back; an open NDJSON
stream brings a changed assignment within milliseconds of the operator's round, and `on_change`
wakes the agent's loop so that it enforces it at once instead of at its next period. None of
this goes through etcd: the NodePower status stays the slow, deadbanded view.

The agent authenticates with a token it mints at start; it publishes the token's SHA-256 in its
own NodePower status (`telemetryTokenHash`), which only it may write, and the operator checks a
presented token against it. Until the operator has seen that status the endpoint answers 401,
and the agent keeps to the API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import ValidationError

from ampacity.api.nodepower import NodePowerSpec, NodePowerStatus
from ampacity.federated import tls

log = logging.getLogger("ampacity.agent")

#: Wait before reopening a broken assignment stream...
RECONNECT_SECONDS = 1.0
#: ... and one the operator refused (no budget for the node, the token's hash not seen yet).
REFUSED_RETRY_SECONDS = 5.0
#: A stream silent this long is dead (the operator repeats the assignment every 2 s).
KEEPALIVE_READ_SECONDS = 10.0


class LinkError(Exception):
    """The operator's endpoint did not answer with an assignment (in words, for logs)."""


@dataclass(frozen=True)
class Answer:
    """What the operator said: the NodePower's generation and the node's assignment (None: no
    round has assigned the node yet, or it is under no budget)."""

    generation: int
    spec: NodePowerSpec | None


def _answer(data: object) -> Answer:
    if not isinstance(data, dict):
        raise LinkError("the answer is not an object")
    try:
        spec = NodePowerSpec.model_validate(data["spec"]) if data.get("spec") is not None else None
        return Answer(int(data.get("generation") or 0), spec)
    except (ValidationError, ValueError, TypeError) as error:
        raise LinkError(f"unreadable assignment: {error}") from error


class OperatorLink:
    """One agent's link to the operator; `client` is kept open for the agent's lifetime."""

    def __init__(
        self,
        base_url: str,
        node: str,
        client: httpx.AsyncClient | None = None,
        timeout: float = 3.0,
        token: str | None = None,
        ca_file: Path | None = None,
    ) -> None:
        """`ca_file`: the operator CA's certificate, which an https:// endpoint's is verified
        against (hostname checked); without it, the system's trust store."""
        self.base_url = base_url.rstrip("/")
        self.node = node
        self.timeout = timeout
        self.token = token or secrets.token_urlsafe(32)
        #: What the agent publishes in its NodePower status (the same hash as controllers.tokens).
        self.token_hash = hashlib.sha256(self.token.encode()).hexdigest()
        verify: ssl.SSLContext | bool = tls.client_context(ca_file) if ca_file is not None else True
        self._client = client or httpx.AsyncClient(timeout=timeout, verify=verify)
        self._own_client = client is None
        #: The latest answer, and when it came (monotonic seconds).
        self.latest: Answer | None = None
        self.latest_at = -float("inf")
        self._key: object = None
        self._problem = ""

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _took(self, answer: Answer, on_change: Callable[[], None] | None) -> None:
        key = None if answer.spec is None else answer.spec.model_dump(exclude={"assigned_at"})
        self.latest, self.latest_at = answer, time.monotonic()
        if key != self._key:
            self._key = key
            if on_change is not None:
                on_change()

    def _failed(self, problem: str, first_refusal: bool = False) -> LinkError:
        if problem != self._problem:
            # Refused before the first answer: the operator has not seen the token's hash yet.
            level = logging.INFO if first_refusal else logging.WARNING
            log.log(level, "operator telemetry endpoint: %s; using the API server", problem)
        self._problem = problem
        self.latest = None
        return LinkError(problem)

    async def report(self, status: NodePowerStatus, on_change: Callable[[], None] | None = None) -> Answer:
        """Send one sample; return the assignment the operator answered with."""
        try:
            response = await self._client.post(
                f"{self.base_url}/v1/nodepowers/{self.node}/telemetry",
                content=status.model_dump_json(by_alias=True, exclude_none=True),
                headers={**self._headers, "Content-Type": "application/json"},
                timeout=self.timeout,
            )
        except httpx.HTTPError as error:
            raise self._failed(f"unreachable ({type(error).__name__})") from error
        if response.status_code != 200:
            first = response.status_code == 401 and self.latest_at == -float("inf")
            raise self._failed(f"HTTP {response.status_code}: {response.text[:200]}", first)
        try:
            answer = _answer(response.json())
        except (LinkError, ValueError) as error:
            raise self._failed(str(error)) from error
        if self._problem:
            log.info("operator telemetry endpoint answers again")
            self._problem = ""
        self._took(answer, on_change)
        return answer

    async def follow(self, on_change: Callable[[], None], stop: asyncio.Event) -> None:
        """Keep the assignment stream open until `stop`; every changed assignment calls `on_change`."""
        url = f"{self.base_url}/v1/nodepowers/{self.node}/assignments"
        while not stop.is_set():
            wait = RECONNECT_SECONDS
            try:
                timeout = httpx.Timeout(self.timeout, read=KEEPALIVE_READ_SECONDS)
                async with self._client.stream("GET", url, headers=self._headers, timeout=timeout) as stream:
                    if stream.status_code != 200:
                        wait = REFUSED_RETRY_SECONDS
                    else:
                        async for line in stream.aiter_lines():
                            if line.strip():
                                self._took(_answer(json.loads(line)), on_change)
            except (httpx.HTTPError, LinkError, ValueError) as error:
                log.debug("assignment stream of %s: %s", self.node, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def close(self) -> None:
        if self._own_client:
            await self._client.aclose()
