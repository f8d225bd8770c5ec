"""Enrolment apart from administration: what each credential can and cannot do, over real sockets."""

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry, generate_latest

from ampacity.federated.aggregator import AggregatorConfig, create_app, encode_arrays
from ampacity.federated.client import AggregatorError, FederatedClient, enrol
from ampacity.federated.wire import CLIENT_HEADER

ADMIN = "admin-secret"
ENROLMENT = "population-enrolment-token"
MODEL = {"w": np.zeros((2, 2), np.float32)}


@asynccontextmanager
async def federation(state_dir: Path) -> AsyncIterator[tuple[str, httpx.AsyncClient, CollectorRegistry]]:
    registry = CollectorRegistry()
    config = AggregatorConfig(state_dir, ADMIN, enrolment_token=ENROLMENT)
    server = TestServer(create_app(config, registry), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    try:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
            assert (await admin.put("/v1/model", content=encode_arrays(MODEL))).status_code == 200
            yield url, admin, registry
    finally:
        await server.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def enrol_client(url: str, client_id: str, tmp_path: Path) -> str:
    return await asyncio.to_thread(
        enrol, url, ENROLMENT, client_id, {"pop": "p"}, 0.5, credential_file=tmp_path / f"{client_id}.token"
    )


async def open_round(admin: httpx.AsyncClient, clients: list[str]) -> None:
    body = {
        "round_id": "r1",
        "clients": {c: {"local_steps": 1} for c in clients},
        "close_when_complete": False,
    }
    resp = await admin.post("/v1/rounds", json=body)
    assert resp.status_code == 201, resp.text


def upload_headers(token: str, **extra: str) -> dict[str, str]:
    return {**bearer(token), "X-Ampacity-Round": "r1", "X-Ampacity-Base-Version": "0", **extra}


def delta(value: float) -> bytes:
    return encode_arrays({"w": np.full((2, 2), value, np.float32)})


async def test_a_client_credential_can_do_only_client_things(tmp_path: Path) -> None:
    async with federation(tmp_path / "state") as (url, admin, registry):
        token_a = await enrol_client(url, "a", tmp_path)
        token_b = await enrol_client(url, "b", tmp_path)
        await open_round(admin, ["a", "b"])
        async with httpx.AsyncClient(base_url=url) as http:
            # Administration is refused to a client and to the enrolment token alike.
            for token in (token_a, ENROLMENT):
                forbidden = [
                    await http.put("/v1/model", content=delta(9.0), headers=bearer(token)),
                    await http.post("/v1/rounds/r1/close", headers=bearer(token)),
                    await http.post(
                        "/v1/rounds", json={"round_id": "r2", "clients": {"a": {}}}, headers=bearer(token)
                    ),
                    await http.get("/v1/status", headers=bearer(token)),
                    await http.get("/v1/clients", headers=bearer(token)),
                    await http.delete("/v1/clients/b", headers=bearer(token)),
                ]
                assert [r.status_code for r in forbidden] == [401] * 6, [r.text for r in forbidden]
            # The enrolment token is not a client: no task, no model, no upload.
            assert (await http.get("/v1/task", headers=bearer(ENROLMENT))).status_code == 401
            assert (await http.get("/v1/model", headers=bearer(ENROLMENT))).status_code == 401
            # A client cannot upload for another client id ...
            resp = await http.post(
                "/v1/updates", content=delta(1.0), headers=upload_headers(token_a, **{CLIENT_HEADER: "b"})
            )
            assert resp.status_code == 403 and resp.json()["kind"] == "wrong_client"
            assert "belongs to client 'a', not 'b'" in resp.json()["error"]
            # ... nor upload twice for one assignment.
            first = await http.post(
                "/v1/updates", content=delta(1.0), headers=upload_headers(token_a, **{CLIENT_HEADER: "a"})
            )
            assert first.status_code == 202, first.text
            again = await http.post("/v1/updates", content=delta(5.0), headers=upload_headers(token_a))
            assert again.status_code == 409 and again.json()["kind"] == "duplicate"
            # b's slot is untouched by all of that, and b still delivers.
            status = (await admin.get("/v1/status")).json()
            assert status["round"]["accepted"] == ["a"]
            assert (
                await http.post("/v1/updates", content=delta(3.0), headers=upload_headers(token_b))
            ).status_code == 202
            # The model is still the one the admin installed, until the admin closes the round.
            model = await http.get("/v1/model", headers=bearer(token_a))
            assert model.headers["X-Ampacity-Model-Version"] == "0"
        closed = await admin.post("/v1/rounds/r1/close")
        assert closed.json()["phase"] == "Completed" and closed.json()["result"]["accepted"] == 2
        metrics = generate_latest(registry).decode()
        assert 'ampacity_fl_rejected_updates_total{reason="wrong_client"} 1.0' in metrics
        assert 'ampacity_fl_rejected_updates_total{reason="duplicate"} 1.0' in metrics


async def test_enrolling_twice_keeps_the_identity_and_nobody_else_can_take_it(tmp_path: Path) -> None:
    async with federation(tmp_path / "state") as (url, admin, registry):
        token = await enrol_client(url, "a", tmp_path)
        assert (tmp_path / "a.token").read_text() == token
        again = await enrol_client(url, "a", tmp_path)  # a restarted client, same credential file
        assert again == token
        clients = (await admin.get("/v1/clients")).json()
        assert list(clients) == ["a"] and clients["a"]["labels"] == {"pop": "p"}
        # Someone else with the population's enrolment token cannot take over "a".
        with pytest.raises(AggregatorError, match=r"409 .*enrolled with another credential"):
            await asyncio.to_thread(enrol, url, ENROLMENT, "a", credential_file=tmp_path / "intruder.token")
        # Nor enrol without proving a token of its own, nor with no credential at all.
        async with httpx.AsyncClient(base_url=url) as http:
            no_hash = await http.post("/v1/clients", json={"client_id": "c"}, headers=bearer(ENROLMENT))
            assert no_hash.status_code == 400 and "token_sha256" in no_hash.json()["error"]
            digest = hashlib.sha256(b"x").hexdigest()
            anonymous = await http.post("/v1/clients", json={"client_id": "c", "token_sha256": digest})
            assert anonymous.status_code == 401
            misspelt = await http.post(
                "/v1/clients",
                json={"client_id": "c", "token_sha256": digest, "lables": {}},
                headers=bearer(ENROLMENT),
            )
            assert misspelt.status_code == 400 and "lables" in misspelt.json()["error"]
            # A client refreshing its own labels with its token keeps its identity; not someone else's.
            own = await http.post(
                "/v1/clients", json={"client_id": "a", "labels": {"pop": "q"}}, headers=bearer(token)
            )
            assert own.status_code == 200 and own.json()["created"] is False
            other = await http.post(
                "/v1/clients", json={"client_id": "z", "token_sha256": digest}, headers=bearer(token)
            )
            assert other.status_code == 403
        assert (await admin.get("/v1/clients")).json()["a"]["labels"] == {"pop": "q"}
        metrics = generate_latest(registry).decode()
        assert 'ampacity_fl_enrolments_total{result="created"} 1.0' in metrics
        assert 'ampacity_fl_enrolments_total{result="existing"} 2.0' in metrics


async def test_a_revoked_client_is_refused_and_cannot_enrol_again(tmp_path: Path) -> None:
    async with federation(tmp_path / "state") as (url, admin, _):
        token = await enrol_client(url, "a", tmp_path)
        await enrol_client(url, "b", tmp_path)
        assert (await admin.delete("/v1/clients/a")).status_code == 204
        assert (await admin.get("/v1/clients")).json()["a"]["revoked"] is True

        def use(token: str) -> Any:
            with FederatedClient(url, token) as client:
                return client.fetch_task()

        with pytest.raises(AggregatorError, match="401"):
            await asyncio.to_thread(use, token)
        with pytest.raises(AggregatorError, match=r"403 .*revoked"):
            await enrol_client(url, "a", tmp_path)
        refused = await admin.post("/v1/rounds", json={"round_id": "r1", "clients": {"a": {}, "b": {}}})
        assert refused.status_code == 400 and "revoked" in refused.json()["error"]
