"""The aggregator service over real sockets on 127.0.0.1 (aiohttp TestServer + httpx)."""

import asyncio
import io
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from ampacity.federated.aggregator import AggregatorConfig, create_app, decode_arrays, encode_arrays
from ampacity.federated.client import FederatedClient, TrainResult
from ampacity.federated.wire import Task

ADMIN = "admin-secret"
MODEL = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}


def delta(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, value, v.dtype) for k, v in MODEL.items()}


@asynccontextmanager
async def aggregator(state_dir: Path, **config: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A running service; yields an admin client whose base_url is the service."""
    registry = CollectorRegistry()
    server = TestServer(create_app(AggregatorConfig(state_dir, ADMIN, **config), registry), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    try:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}) as http:
            yield http
    finally:
        await server.close()


async def setup(
    http: httpx.AsyncClient, clients: list[str], model: dict[str, np.ndarray] = MODEL
) -> dict[str, str]:
    resp = await http.put("/v1/model", content=encode_arrays(model))
    assert resp.status_code == 200, resp.text
    tokens = {}
    for cid in clients:
        resp = await http.post("/v1/clients", json={"client_id": cid, "labels": {"zone": "a"}})
        assert resp.status_code == 201, resp.text
        tokens[cid] = resp.json()["token"]
    return tokens


async def open_round(http: httpx.AsyncClient, round_id: str, clients: list[str], **spec: Any) -> None:
    body = {"round_id": round_id, "clients": {c: {"local_steps": 5} for c in clients}, **spec}
    resp = await http.post("/v1/rounds", json=body)
    assert resp.status_code == 201, resp.text


async def upload(
    http: httpx.AsyncClient,
    token: str,
    round_id: str,
    payload: bytes,
    base_version: int = 0,
    weight: float = 1.0,
) -> httpx.Response:
    headers = {
        "Authorization": f"Bearer {token}",
        "X-Ampacity-Round": round_id,
        "X-Ampacity-Base-Version": str(base_version),
        "X-Ampacity-Weight": str(weight),
    }
    return await http.post("/v1/updates", content=payload, headers=headers)


async def status(http: httpx.AsyncClient) -> dict[str, Any]:
    resp = await http.get("/v1/status")
    assert resp.status_code == 200
    body: dict[str, Any] = resp.json()
    return body


async def wait_for(check: Callable[[], Coroutine[Any, Any, bool]], what: str) -> None:
    for _ in range(200):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def round_phase(http: httpx.AsyncClient, phase: str) -> None:
    async def check() -> bool:
        return bool((await status(http))["round"]["phase"] == phase)

    await wait_for(check, f"phase {phase}")


async def global_model(http: httpx.AsyncClient) -> tuple[int, dict[str, np.ndarray]]:
    resp = await http.get("/v1/model")
    assert resp.status_code == 200
    return int(resp.headers["X-Ampacity-Model-Version"]), decode_arrays(resp.content)[0]


async def test_accepts_good_updates_rejects_bad_ones_and_the_aggregate_ignores_them(tmp_path: Path) -> None:
    async with aggregator(tmp_path) as http:
        tokens = await setup(http, ["a", "b", "c", "outsider"])
        await open_round(http, "r1", ["a", "b", "c"], close_when_complete=False, max_norm=100.0)

        bad_cases = [
            (b"not an npz", 400, "not a valid .npz"),
            (encode_arrays({**delta(1.0), "b": np.array([0, np.nan, 0, 0], np.float32)}), 422, "NaN"),
            (encode_arrays({**delta(1.0), "w": np.zeros((4, 3), np.float32)}), 422, "shape"),
            (encode_arrays({k: v.astype(np.float64) for k, v in delta(1.0).items()}), 422, "dtype float64"),
            (encode_arrays(delta(1e6)), 422, "norm"),
        ]
        for payload, code, reason in bad_cases:
            resp = await upload(http, tokens["c"], "r1", payload)
            assert resp.status_code == code, resp.text
            assert reason in resp.json()["error"]

        assert (await upload(http, "wrong-token", "r1", encode_arrays(delta(1.0)))).status_code == 401
        resp = await upload(http, tokens["outsider"], "r1", encode_arrays(delta(1.0)))
        assert resp.status_code == 403 and "not selected" in resp.json()["error"]
        assert (await upload(http, tokens["a"], "r9", encode_arrays(delta(1.0)))).status_code == 409

        resp = await upload(http, tokens["a"], "r1", encode_arrays(delta(1.0)), weight=1.0)
        assert resp.status_code == 202 and resp.json()["status"] == "accepted"
        resp = await upload(http, tokens["b"], "r1", encode_arrays(delta(4.0)), weight=3.0)
        assert resp.status_code == 202
        again = await upload(http, tokens["b"], "r1", encode_arrays(delta(4.0)))
        assert again.status_code == 409 and "already" in again.json()["error"]

        resp = await http.post("/v1/rounds/r1/close")
        assert resp.status_code == 200
        record = resp.json()
        assert record["phase"] == "Completed"
        assert record["accepted"] == ["a", "b"] and len(record["rejected"]) == 5
        version, model = await global_model(http)
        assert version == 1
        # Weighted mean of the accepted deltas only: (1*1 + 3*4) / 4.
        np.testing.assert_allclose(model["w"], 3.25)
        assert model["w"].dtype == np.float32

        metrics = (await http.get("/metrics")).text
        assert 'ampacity_fl_updates_total{result="accepted"} 2.0' in metrics
        # 5 invalid payloads, a bad token, an outsider, an unknown round, a duplicate.
        assert 'ampacity_fl_updates_total{result="rejected"} 9.0' in metrics
        assert 'ampacity_fl_rounds_total{phase="completed"} 1.0' in metrics
        assert "ampacity_fl_global_model_version 1.0" in metrics


async def test_admin_endpoints_need_the_admin_token(tmp_path: Path) -> None:
    async with aggregator(tmp_path) as http:
        tokens = await setup(http, ["a"])
        resp = await http.post("/v1/rounds", json={}, headers={"Authorization": f"Bearer {tokens['a']}"})
        assert resp.status_code == 401
        resp = await http.post("/v1/rounds", json={"round_id": "r1", "clients": {"ghost": {}}})
        assert resp.status_code == 400 and "not registered" in resp.json()["error"]


async def test_oversized_update_is_refused_with_json(tmp_path: Path) -> None:
    async with aggregator(tmp_path, max_update_bytes=2000) as http:
        tokens = await setup(http, ["a"])
        await open_round(http, "r1", ["a"])
        big = encode_arrays(delta(1.0)) + b"\0" * 4096
        resp = await upload(http, tokens["a"], "r1", big)
        assert resp.status_code == 413 and "larger than 2000" in resp.json()["error"]
        # A compressed payload that is small on the wire but inflates past the limit.
        buf = io.BytesIO()
        np.savez_compressed(buf, w=np.zeros((3, 1000), np.float32), b=np.zeros(4, np.float32))
        resp = await upload(http, tokens["a"], "r1", buf.getvalue())
        # 413 like the plain oversized body: the limit is on what the update inflates to.
        assert resp.status_code == 413 and "inflates" in resp.json()["error"]
        assert resp.json()["kind"] == "too_large"
        assert (await upload(http, tokens["a"], "r1", encode_arrays(delta(1.0)))).status_code == 202


async def test_restart_mid_round_keeps_received_updates(tmp_path: Path) -> None:
    async with aggregator(tmp_path) as http:
        tokens = await setup(http, ["a", "b", "c"])
        await open_round(http, "r1", ["a", "b", "c"])
        for cid, value in (("a", 1.0), ("b", 2.0)):
            assert (await upload(http, tokens[cid], "r1", encode_arrays(delta(value)))).status_code == 202

    # A new process on the same state directory: tokens, the round and both updates survive.
    async with aggregator(tmp_path) as http:
        record = (await status(http))["round"]
        assert record["phase"] == "Training" and record["accepted"] == ["a", "b"]
        dup = await upload(http, tokens["a"], "r1", encode_arrays(delta(1.0)))
        assert dup.status_code == 409
        assert (await upload(http, tokens["c"], "r1", encode_arrays(delta(6.0)))).status_code == 202
        await round_phase(http, "Completed")
        version, model = await global_model(http)
        assert version == 1
        np.testing.assert_allclose(model["b"], 3.0)


async def test_straggler_past_the_deadline_does_not_block_and_is_folded_in_later(tmp_path: Path) -> None:
    async with aggregator(tmp_path, deadline_poll_s=0.02) as http:
        tokens = await setup(http, ["fast", "slow"])
        await open_round(http, "r1", ["fast", "slow"], deadline_seconds=1.0, min_quorum=1)
        assert (await upload(http, tokens["fast"], "r1", encode_arrays(delta(2.0)))).status_code == 202
        await round_phase(http, "Completed")
        _, model = await global_model(http)
        np.testing.assert_allclose(model["w"], 2.0)

        late = await upload(http, tokens["slow"], "r1", encode_arrays(delta(-9.0)))
        assert late.status_code == 202 and late.json()["status"] == "late"
        assert (await status(http))["late_buffered"] == ["r1.slow"]

        # Next round: the late update joins with staleness weight (1+1)^-0.5 against version 1.
        await open_round(http, "r2", ["fast"])
        assert (
            await upload(http, tokens["fast"], "r2", encode_arrays(delta(1.0)), base_version=1)
        ).status_code == 202
        await round_phase(http, "Completed")
        record = (await status(http))["round"]
        assert record["result"]["late_included"] == 1
        w = 2.0**-0.5
        _, model = await global_model(http)
        np.testing.assert_allclose(model["w"], 2.0 + (1.0 + w * -9.0) / (1.0 + w), rtol=1e-6)
        assert (await status(http))["late_buffered"] == []


async def test_round_without_quorum_fails_with_a_reason(tmp_path: Path) -> None:
    async with aggregator(tmp_path) as http:
        tokens = await setup(http, ["a", "b"])
        await open_round(http, "r1", ["a", "b"], min_quorum=2)
        assert (await upload(http, tokens["a"], "r1", encode_arrays(delta(1.0)))).status_code == 202
        record = (await http.post("/v1/rounds/r1/close")).json()
        assert record["phase"] == "Failed" and "quorum not met: 1 of the required 2" in record["message"]
        version, model = await global_model(http)
        assert version == 0 and not model["w"].any()


async def test_hierarchical_mean_equals_flat_mean(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    updates = {
        f"c{i}": {k: rng.standard_normal(v.shape).astype(np.float64) for k, v in MODEL.items()}
        for i in range(4)
    }
    weights = {"c0": 10.0, "c1": 30.0, "c2": 5.0, "c3": 55.0}
    model64 = {k: v.astype(np.float64) for k, v in MODEL.items()}

    async with aggregator(tmp_path / "flat") as flat:
        tokens = await setup(flat, list(updates), model64)
        await open_round(flat, "r1", list(updates))
        for cid, arrays in updates.items():
            resp = await upload(flat, tokens[cid], "r1", encode_arrays(arrays), weight=weights[cid])
            assert resp.status_code == 202
        await round_phase(flat, "Completed")
        _, flat_model = await global_model(flat)

    async with aggregator(tmp_path / "root") as root:
        mid_tokens = await setup(root, ["mid-a", "mid-b"], model64)
        await open_round(root, "r1", ["mid-a", "mid-b"])
        url = str(root.base_url).rstrip("/")
        groups = {"mid-a": ["c0", "c1"], "mid-b": ["c2", "c3"]}
        async with (
            aggregator(tmp_path / "a", parent_url=url, parent_token=mid_tokens["mid-a"]) as mid_a,
            aggregator(tmp_path / "b", parent_url=url, parent_token=mid_tokens["mid-b"]) as mid_b,
        ):
            for mid, name in ((mid_a, "mid-a"), (mid_b, "mid-b")):
                tokens = {}
                for cid in groups[name]:
                    resp = await mid.post("/v1/clients", json={"client_id": cid})
                    tokens[cid] = resp.json()["token"]
                await open_round(mid, "r1", groups[name])
                for cid in groups[name]:
                    resp = await upload(
                        mid, tokens[cid], "r1", encode_arrays(updates[cid]), weight=weights[cid]
                    )
                    assert resp.status_code == 202, resp.text
            await round_phase(root, "Completed")
        record = (await status(root))["round"]
        assert record["accepted"] == ["mid-a", "mid-b"] and record["result"]["weight"] == 100.0
        _, tree_model = await global_model(root)
    for key in MODEL:
        np.testing.assert_allclose(tree_model[key], flat_model[key], rtol=1e-12, atol=1e-12)


async def test_client_sdk_fetches_trains_and_uploads(tmp_path: Path) -> None:
    async with aggregator(tmp_path) as http:
        tokens = await setup(http, ["a"])
        await open_round(http, "r1", ["a"])
        url = str(http.base_url).rstrip("/")
        seen: list[Task] = []

        def train(params: dict[str, np.ndarray], task: Task) -> TrainResult:
            seen.append(task)
            return TrainResult({k: v + 0.5 for k, v in params.items()}, num_samples=12)

        def run_client() -> tuple[object, object]:
            with FederatedClient(url, tokens["a"]) as client:
                first = client.run_once(train)
                second = client.run_once(train)  # the round closed: nothing to do
            return first, second

        first, second = await asyncio.to_thread(run_client)
        assert getattr(first, "accepted", False) and second is None
        assert seen == [Task(round_id="r1", model_version=0, local_steps=5, deadline_unix_s=None)]
        await round_phase(http, "Completed")
        # What the controller feeds to the FedCompass speed estimator.
        report = (await status(http))["round"]["reports"]["a"]
        assert report["local_steps"] == 5 and report["elapsed_s"] >= 0
        _, model = await global_model(http)
        np.testing.assert_allclose(model["w"], 0.5)


def test_npz_codec_refuses_zip_bombs() -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, w=np.zeros(1_000_000, np.float32))
    try:
        decode_arrays(buf.getvalue(), max_bytes=1000)
    except ValueError as exc:
        assert "inflates" in str(exc)
    else:
        raise AssertionError("a payload inflating past the limit was accepted")
