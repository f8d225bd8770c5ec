"""A real Flower NumPyClient (flwr from PyPI) runs unchanged under Ampacity's client."""

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from flwr.client import NumPyClient
from prometheus_client import CollectorRegistry

from ampacity.federated.aggregator import AggregatorConfig, create_app, encode_arrays
from ampacity.federated.client import FederatedClient, enrol
from ampacity.federated.eval import evaluation
from ampacity.federated.flower import FlowerClientError, flower_train, load_factory
from ampacity.federated.wire import Task

EXAMPLE = Path(__file__).parents[3] / "examples" / "flower_digits.py"
TASK = Task(round_id="r1", model_version=0, local_steps=3, deadline_unix_s=None)


def test_the_example_is_a_plain_flower_numpy_client() -> None:
    client = load_factory(f"{EXAMPLE}:make_client")(shard="1", shards="4")
    assert isinstance(client, NumPyClient)
    assert "ampacity" not in EXAMPLE.read_text().split('"""', 2)[2]  # no Ampacity import in its code


async def test_a_flower_client_trains_and_uploads_through_the_adapter(tmp_path: Path) -> None:
    app = create_app(
        AggregatorConfig(tmp_path / "state", "admin", enrolment_token="enrol"), CollectorRegistry()
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    try:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer admin"}) as admin:
            model = evaluation.model_params(evaluation.initial_model())
            assert (await admin.put("/v1/model", content=encode_arrays(model))).status_code == 200
            token = await asyncio.to_thread(enrol, url, "enrol", "flower-0", credential_file=tmp_path / "t")
            body = {
                "round_id": "r1",
                "clients": {"flower-0": {"local_steps": 20}},
                "close_when_complete": False,
            }
            assert (await admin.post("/v1/rounds", json=body)).status_code == 201
            flower = load_factory(f"{EXAMPLE}:make_client")(shard="0", shards="4")

            def run() -> object:
                with FederatedClient(url, token) as client:
                    return client.run_once(flower_train(flower))

            result = await asyncio.to_thread(run)
            assert result is not None and result.accepted, result  # type: ignore[attr-defined]
            record = (await admin.get("/v1/status")).json()["round"]
            assert record["accepted"] == ["flower-0"]
            report = record["reports"]["flower-0"]
            # Flower's metrics["accuracy"] reached the round; the steps came from the assignment.
            assert 0 < report["accuracy"] <= 1 and report["local_steps"] == 20
            closed = (await admin.post("/v1/rounds/r1/close")).json()
            assert closed["phase"] == "Completed" and closed["result"]["update_norm"] > 0
    finally:
        await server.close()


class Broken(NumPyClient):  # type: ignore[misc]
    def __init__(self, returns: object) -> None:
        self.returns = returns

    def fit(self, parameters: list[np.ndarray], config: dict[str, object]) -> object:
        assert config == {"local_steps": 3, "round_id": "r1", "model_version": 0, "server_round": 1}
        return self.returns


def test_a_fit_that_does_not_fit_the_model_is_an_error_not_a_guess() -> None:
    params = {"bias": np.zeros(2), "weight": np.zeros((2, 2))}
    with pytest.raises(FlowerClientError, match="returned 1 arrays for a model of 2"):
        flower_train(Broken(([np.zeros(2)], 5, {})))(params, TASK)
    # Flower's own check of fit's return type runs too.
    with pytest.raises(TypeError):
        flower_train(Broken(([np.zeros(2)], "five", {})))(params, TASK)
    ok = flower_train(Broken(([np.ones(2), np.ones((2, 2))], 5, {"accuracy": 1.5})))(params, TASK)
    assert ok.num_samples == 5 and ok.accuracy is None and list(ok.params) == ["bias", "weight"]
