"""The power telemetry endpoint: the fast way between node agents and the operator's power runtime.

    POST /v1/nodepowers/<node>/telemetry     body: a NodePowerStatus (the agent's sample)
      -> {"generation": <NodePower generation>, "spec": <NodePowerSpec> | null}
    GET  /v1/nodepowers/<node>/assignments   -> the same object as NDJSON, one line at once, one
                                                on every change of the assignment, one every
                                                KEEPALIVE_SECONDS

Both take `Authorization: Bearer <token>`, where the token is one the agent minted and whose
SHA-256 it published in its own NodePower status (`status.telemetryTokenHash`; the chart's
admission policy lets only the node's agent write that status): `controllers.tokens.matches_hash`.
A node without a NodePower (under no budget) is answered 404; the agent then reads its NodePower
from the API server, as it does whenever this endpoint cannot answer.

Samples sent here never reach etcd: the runtime sums the row in memory and runs the pure policy,
and the answer (or the open stream, within milliseconds of the round that changed it) carries the
node's caps. `assignedAt` in every answer is the time of the answer, so an agent that stops
hearing from the operator ages its assignment and fails safe as before.

Plain HTTP, like the trainer report endpoint (`controllers.trainingjob.reports`): the operator
serves no TLS of its own, so on a network where pod traffic can be read a sniffed token lets
its holder report false power for that node until the agent restarts (which mints a new token).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl

from aiohttp import web
from pydantic import ValidationError

from ampacity.api.nodepower import NodePowerStatus
from controllers.powerbudget.runtime import PowerRuntime

log = logging.getLogger(__name__)

#: Port the endpoint listens on (the operator's Service exposes it to the agents).
POWER_PORT = int(os.environ.get("AMPACITY_POWER_PORT", "8083"))
#: How often an open assignment stream repeats the assignment when nothing changes (so a dead
#: connection is noticed, and the agent's assignment stays fresh between its own reports).
KEEPALIVE_SECONDS = 2.0
#: Largest report accepted (a NodePower status of 8-16 GPUs is a few kB).
MAX_REPORT_BYTES = 256 * 1024


def telemetry_path(node: str) -> str:
    return f"/v1/nodepowers/{node}/telemetry"


def assignments_path(node: str) -> str:
    return f"/v1/nodepowers/{node}/assignments"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class PowerEndpoint:
    """The endpoint's state for the operator's lifetime (kept in kopf's memo, closed at cleanup)."""

    def __init__(self, power: PowerRuntime) -> None:
        self.power = power
        self.runner: web.AppRunner | None = None

    def _refusal(self, request: web.Request, node: str) -> web.Response | None:
        """Why the caller may not speak for `node` (None: it may)."""
        if node not in self.power.node_powers:
            return _error(404, f"no NodePower {node}: the node is under no PowerBudget")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error(401, "a bearer token is required")
        if not self.power.authorized(node, token.strip()):
            return _error(401, f"the token is not the one published in NodePower {node}'s status")
        return None

    async def telemetry(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        refusal = self._refusal(request, node)
        if refusal is not None:
            return refusal
        try:
            status = NodePowerStatus.model_validate_json(await request.read())
        except ValidationError as error:
            return _error(400, f"not a NodePower status: {error.errors(include_url=False)}")
        self.power.accept_report(node, status)
        return web.json_response(self.power.assignment(node))

    async def assignments(self, request: web.Request) -> web.StreamResponse:
        node = request.match_info["node"]
        refusal = self._refusal(request, node)
        if refusal is not None:
            return refusal
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
            while node in self.power.node_powers:
                changed = self.power.assignment_changed(node)
                line = json.dumps(self.power.assignment(node), separators=(",", ":")) + "\n"
                await response.write(line.encode())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), KEEPALIVE_SECONDS)
            # The NodePower is gone: a last line says so, and the agent falls back to the API.
            await response.write(b'{"generation":0,"spec":null}\n')
        return response

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


ENDPOINT: web.AppKey[PowerEndpoint] = web.AppKey("power-endpoint", PowerEndpoint)


def make_app(power: PowerRuntime) -> web.Application:
    endpoint = PowerEndpoint(power)
    app = web.Application(client_max_size=MAX_REPORT_BYTES)
    app[ENDPOINT] = endpoint
    app.router.add_post(telemetry_path("{node}"), endpoint.telemetry)
    app.router.add_get(assignments_path("{node}"), endpoint.assignments)
    return app


async def start(
    power: PowerRuntime,
    port: int = POWER_PORT,
    host: str = "0.0.0.0",
    ssl_context: ssl.SSLContext | None = None,
) -> PowerEndpoint:
    """Serve the endpoint on `host:port` (every interface: agents reach it through a Service), over
    TLS with `ssl_context` (`controllers.endpoint_tls`)."""
    app = make_app(power)
    # Streams stay open for the agents' lifetime: no keep-alive timeout cuts them.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    log.info("power telemetry endpoint on %s://%s:%d", "https" if ssl_context else "http", host, port)
    endpoint = app[ENDPOINT]
    endpoint.runner = runner
    return endpoint
