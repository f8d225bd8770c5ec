"""Per-object tokens derived from one operator key, so the operator never has to read a Secret.

A FederatedRound's aggregator admin token is HMAC-SHA256(key, "<purpose>/<uid>"): the
operator writes it into the round's Secret once (RBAC: create, not get) and can
recompute it after a restart. The key comes from AMPACITY_TOKEN_KEY (a Secret the
Helm chart generates once and keeps across upgrades).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

KEY_ENV = "AMPACITY_TOKEN_KEY"


def derive_token(purpose: str, uid: str) -> str:
    key = os.environ.get(KEY_ENV)
    if not key:
        raise RuntimeError(
            f"{KEY_ENV} is not set: the operator needs its token key to derive per-object tokens"
        )
    digest = hmac.new(key.encode(), f"{purpose}/{uid}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")
