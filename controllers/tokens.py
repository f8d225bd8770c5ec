"""Per-object tokens, one scheme for every kind, derived from one operator key: the operator never
reads a Secret.

A token is HMAC-SHA256(key, "<purpose>/<uid>") (URL-safe base64): the operator writes it into the
object's Secret once (RBAC: create and delete, not get), recomputes it after a restart, and checks
a presented one by recomputing it. The key comes from AMPACITY_TOKEN_KEY (a Secret the Helm chart
generates once and keeps across upgrades). Purposes:

- `TRAINING_REPORT`: a TrainingJob's workers present it to the trainer report endpoint;
- `AGGREGATOR_ADMIN`: the operator presents it to a FederatedRound's aggregator.

A status may keep the SHA-256 of the token it wrote (`token_hash`), so that a Secret written under
an earlier key is noticed and replaced.

The other direction, for callers that no Secret can reach one by one (a DaemonSet's node agents):
the caller mints a random token and publishes its hash where only it may write (a node agent's own
NodePower status, guarded by the chart's admission policy); `matches_hash` checks a presented token
against it. NodePower `status.telemetryTokenHash` is this, for the power telemetry endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Any

from ampacity.kube import Conflict, Kube

KEY_ENV = "AMPACITY_TOKEN_KEY"
TRAINING_REPORT = "trainingjob-report"
AGGREGATOR_ADMIN = "aggregator-admin"


def derive_token(purpose: str, uid: str) -> str:
    key = os.environ.get(KEY_ENV)
    if not key:
        raise RuntimeError(
            f"{KEY_ENV} is not set: the operator needs its token key to derive per-object tokens"
        )
    digest = hmac.new(key.encode(), f"{purpose}/{uid}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def token_hash(token: str) -> str:
    """What a status may keep of a token: its SHA-256 (hex)."""
    return hashlib.sha256(token.encode()).hexdigest()


def verify(purpose: str, uid: str, presented: str) -> bool:
    """Whether `presented` is the token of the object with `uid` for `purpose`."""
    if not uid or not presented:
        return False
    return hmac.compare_digest(derive_token(purpose, uid), presented)


def matches_hash(presented: str, known_hash: str) -> bool:
    """Whether `presented` is the token whose SHA-256 the caller published as `known_hash`."""
    if not presented or not known_hash:
        return False
    return hmac.compare_digest(token_hash(presented), known_hash)


async def write_secret(kube: Kube, secret: dict[str, Any], token: str, known_hash: str) -> str:
    """Make sure `secret` (holding `token`) exists; returns the token's hash to keep in the status.

    Nothing is written when `known_hash` says the Secret already holds this token. Otherwise the
    Secret is created, and one that exists (lost hash, or a token of an earlier key) is replaced:
    the operator cannot read it to compare.
    """
    digest = token_hash(token)
    if known_hash == digest:
        return digest
    try:
        await kube.create(secret)
    except Conflict:
        await kube.delete("Secret", secret["metadata"]["namespace"], secret["metadata"]["name"])
        await kube.create(secret)
    return digest
