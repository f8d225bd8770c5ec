"""The NixlConnector's prefill/decode handshake, as vLLM implements it
(`vllm/distributed/kv_transfer/kv_connector/v1/nixl_connector.py`), with the KV read itself
replaced by a timed request over the side channel (NIXL moves GPU memory over RDMA; there is none here).

- A prefill request carries `kv_transfer_params` `{"do_remote_decode": true, ...}` (vllm-router sends
  it with `max_tokens=1`, `stream=false`). When it finishes length-capped, the producer keeps the
  prompt's full KV blocks and answers with `{"do_remote_prefill": true, "do_remote_decode": false,
  "remote_block_ids": [...], "remote_engine_id": ..., "remote_request_id": ..., "remote_host": ...,
  "remote_port": ..., "tp_size": ...}`, host and port being its side channel
  (VLLM_NIXL_SIDE_CHANNEL_HOST/PORT). A prompt shorter than one block sends no blocks.
- The decode request carries those params back. The consumer reads the blocks from the producer's
  side channel; the producer frees them once read, or after VLLM_NIXL_ABORT_REQUEST_TIMEOUT (480 s)
  unread. A read of blocks the producer does not hold fails the KV load, and under vLLM's
  `kv_load_failure_policy` "fail" (the default) the request finishes with an error: the OpenAI server
  answers 500 InternalServerError "Internal server error". Under "recompute" the consumer prefills
  the prompt itself.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp

BLOCK_SIZE = 16
ABORT_TIMEOUT_SECONDS = 480.0
PRODUCER_ROLES = ("kv_producer", "kv_both")
CONSUMER_ROLES = ("kv_consumer", "kv_both")
READ_PATH = "/nixl/read"


class KVLoadError(RuntimeError):
    """The consumer could not read the prompt's KV cache from the producer."""


@dataclass(frozen=True)
class KVTransferConfig:
    """The parts of vLLM's `--kv-transfer-config` this engine acts on."""

    connector: str
    role: str
    load_failure_policy: str = "fail"

    @classmethod
    def parse(cls, text: str) -> KVTransferConfig:
        raw = json.loads(text)
        connector = raw.get("kv_connector")
        if connector != "NixlConnector":
            raise ValueError(f"kv_connector {connector!r} is not supported here; only NixlConnector is")
        role = raw.get("kv_role")
        if role not in ("kv_producer", "kv_consumer", "kv_both"):
            raise ValueError(f"kv_role must be kv_producer, kv_consumer or kv_both, got {role!r}")
        policy = raw.get("kv_load_failure_policy", "fail")
        if policy not in ("fail", "recompute"):
            raise ValueError(f"kv_load_failure_policy must be fail or recompute, got {policy!r}")
        return cls(connector, role, policy)


@dataclass
class _Held:
    block_ids: list[int]
    tokens: int
    expires: float


class Producer:
    """The prefill side: blocks kept for consumers to read, keyed by request id."""

    def __init__(self, engine_id: str, host: str, port: int, tp_size: int, release: Any = None) -> None:
        self.engine_id, self.host, self.port, self.tp_size = engine_id, host, port, tp_size
        self.held: dict[str, _Held] = {}
        self._next_block = 0
        self._release = release
        #: (request id, block count) of every read served, for tests and logs.
        self.reads: list[tuple[str, int]] = []

    def finished(
        self, request_id: str, prompt_tokens: int, timeout: float = ABORT_TIMEOUT_SECONDS
    ) -> dict[str, Any]:
        """Keep a finished prefill's blocks; the `kv_transfer_params` of its response."""
        self.expire()
        count = prompt_tokens // BLOCK_SIZE
        blocks = list(range(self._next_block, self._next_block + count))
        self._next_block += count
        if blocks:
            self.held[request_id] = _Held(blocks, count * BLOCK_SIZE, time.monotonic() + timeout)
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": blocks,
            "remote_engine_id": self.engine_id,
            "remote_request_id": request_id,
            "remote_host": self.host,
            "remote_port": self.port,
            "tp_size": self.tp_size,
        }

    @property
    def held_tokens(self) -> int:
        return sum(h.tokens for h in self.held.values())

    def expire(self) -> None:
        now = time.monotonic()
        for rid in [r for r, h in self.held.items() if h.expires <= now]:
            self._free(rid)

    def _free(self, request_id: str) -> None:
        held = self.held.pop(request_id)
        if self._release is not None:
            self._release(held.tokens)

    def read(self, engine_id: str, request_id: str, block_ids: list[int]) -> bool:
        """Serve a consumer's read: only blocks this engine holds for that request."""
        self.expire()
        held = self.held.get(request_id)
        if engine_id != self.engine_id or held is None or held.block_ids != block_ids:
            return False
        self.reads.append((request_id, len(block_ids)))
        self._free(request_id)
        return True


def new_engine_id() -> str:
    return str(uuid.uuid4())


async def pull(session: aiohttp.ClientSession, params: dict[str, Any], transfer_seconds: float) -> int:
    """Read a prefill's blocks from its side channel; the KV tokens read. Raises KVLoadError."""
    blocks = params.get("remote_block_ids") or []
    if not blocks:
        return 0
    host, port = params.get("remote_host"), params.get("remote_port")
    if not host or not port:
        raise KVLoadError("kv_transfer_params lack remote_host/remote_port")
    body = {
        "engine_id": params.get("remote_engine_id"),
        "request_id": params.get("remote_request_id"),
        "block_ids": blocks,
    }
    try:
        async with session.post(
            f"http://{host}:{port}{READ_PATH}", json=body, timeout=aiohttp.ClientTimeout(total=30)
        ) as reply:
            if reply.status != 200:
                raise KVLoadError(f"producer {host}:{port} has no KV blocks for {body['request_id']}")
    except aiohttp.ClientError as err:
        raise KVLoadError(f"cannot reach producer side channel {host}:{port}: {err}") from err
    if transfer_seconds > 0 and math.isfinite(transfer_seconds):
        await asyncio.sleep(transfer_seconds)
    return len(blocks) * BLOCK_SIZE
