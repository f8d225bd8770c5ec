"""The FederatedRound reconciler end to end against the fake API server and a real aggregator
(the service the operator's image runs, on loopback): children, the cohort opened, conditions,
the status patch skipped when nothing changed, failures in words."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import kopf
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from ampacity.api import FEDERATED_ROUND
from ampacity.federated.aggregator import AggregatorConfig, create_app, encode_arrays
from ampacity.kube import Forbidden
from controllers import tokens
from controllers.federatedround import controller as fr
from tests.fakes import FakeKube, Operator

UID = "5678-round"


def round_manifest(port: int) -> dict[str, Any]:
    return {
        "apiVersion": "ampacity.dev/v1alpha1",
        "kind": "FederatedRound",
        "metadata": {
            "name": "r1",
            "namespace": "ns",
            "uid": UID,
            "annotations": {fr.PORT_ANNOTATION: str(port)},
        },
        "spec": {
            "model": "file:///state/global-model.npz",
            "clientSelector": {"pop": "digits"},
            "cohortSize": 2,
            "minQuorum": 1,
            "deadline": "10m",
            "strategy": "fedavg",
            "localSteps": {"min": 1, "max": 3},
            # TLS has its own tests (tests/unit/federated/test_tls.py); this one is about the loop.
            "aggregator": {"insecureHTTP": True},
        },
    }


@pytest.fixture
async def aggregator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """The round's aggregator, run with the admin token the operator derives for the round."""
    monkeypatch.setenv(tokens.KEY_ENV, "operator-key")
    monkeypatch.setenv(fr.URL_OVERRIDE_ENV, "http://127.0.0.1:{port}")
    admin = tokens.derive_token(tokens.AGGREGATOR_ADMIN, UID)
    app = create_app(AggregatorConfig(tmp_path, admin), CollectorRegistry())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {admin}"}) as client:
        assert (
            await client.put("/v1/model", content=encode_arrays({"w": np.zeros(3, np.float32)}))
        ).is_success
        for cid in ("a", "b"):
            assert (
                await client.post("/v1/clients", json={"client_id": cid, "labels": {"pop": "digits"}})
            ).is_success
    try:
        yield url
    finally:
        await server.close()


async def test_a_round_gets_its_aggregator_opens_and_settles(aggregator: str) -> None:
    kube = FakeKube()
    kube.add(round_manifest(int(aggregator.rsplit(":", 1)[1])))
    async with Operator(kube) as op:
        first = await op.reconcile(FEDERATED_ROUND, fr.reconcile, "ns", "r1")
        assert first.error is None
        children = [*kube.of_kind("Deployment"), *kube.of_kind("Service"), *kube.of_kind("Secret")]
        assert sorted(c["metadata"]["name"] for c in children) == [
            "r1-aggregator",
            "r1-aggregator",
            "r1-aggregator-admin",
            "r1-aggregator-enrolment",
        ]
        assert all(c["metadata"]["ownerReferences"][0]["uid"] == UID for c in children)
        secret = kube.stored("Secret", "ns", "r1-aggregator-admin")
        assert secret is not None
        assert base64.b64decode(secret["data"]["token"]).decode() == fr.admin_token(_ctx(kube))
        ready = op.condition("FederatedRound", "ns", "r1")
        assert ready["reason"] == "Training" and ready["message"].startswith(
            "0 of 2 selected clients delivered"
        )
        status = kube.stored("FederatedRound", "ns", "r1")["status"]  # type: ignore[index]
        assert status["phase"] == "Training" and status["selectedClients"] == ["a", "b"]
        assert any(e[1] == "RoundOpened" for e in first.events)

        # Followed, not opened again; nothing changed, so no status patch.
        applies = kube.count("apply")
        quiet = await op.reconcile(FEDERATED_ROUND, fr.reconcile, "ns", "r1")
        assert quiet.error is None and quiet.patch is None and quiet.events == []
        assert kube.count("apply") == applies  # the aggregator's Deployment and Service are as applied

        assert kube.count("create", "Secret") == 2  # made sure of once, not on every poll
        assert quiet.requeue_after == fr.POLL_INTERVAL_S  # the aggregator is polled, not watched

        # An API failure is a condition in words, and the next pass recovers. (A restarted
        # operator, with a fresh memo, makes sure of the Secrets again.)
        op.object_memos.clear()
        refused = "POST secrets in ns: secrets is forbidden"
        kube.fail("create", Forbidden(403, refused), kind="Secret")
        failed = await op.reconcile(FEDERATED_ROUND, fr.reconcile, "ns", "r1")
        assert isinstance(failed.error, kopf.TemporaryError)
        ready = op.condition("FederatedRound", "ns", "r1")
        assert ready["reason"] == "ApiForbidden"
        assert ready["message"] == f"the operator's RBAC does not allow this: {refused}; retrying in 15 s"
        await op.reconcile(FEDERATED_ROUND, fr.reconcile, "ns", "r1")
        assert op.condition("FederatedRound", "ns", "r1")["reason"] == "Training"


def _ctx(kube: FakeKube) -> Any:
    from ampacity.api.federatedround import FederatedRoundStatus
    from controllers.reconciler import Context

    body = kopf.Body(kube.stored("FederatedRound", "ns", "r1"))
    return Context(FEDERATED_ROUND, body, None, FederatedRoundStatus(), kube=kube, logger=None)
