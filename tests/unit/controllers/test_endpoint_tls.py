"""The power telemetry endpoint over TLS: the operator issues itself a certificate from its CA for the
configured names, a real agent (`OperatorLink`) given the CA's certificate reports through it, one
without that certificate is refused by its own TLS check, and the endpoint says when it is plain."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from agents.agent import Agent
from agents.gpu import SimulatedGpuBackend
from agents.operator_link import OperatorLink
from ampacity.federated import tls
from controllers import endpoint_tls
from controllers.cache import ClusterCache
from controllers.federatedround.controller import CA_CERT_FILE_ENV, CA_KEY_FILE_ENV, OperatorCAError
from controllers.powerbudget import endpoint
from controllers.powerbudget.controller import POWER_MEMO
from controllers.powerbudget.runtime import PowerRuntime
from controllers.reconciler import CACHE_MEMO
from tests.unit.controllers.test_power_endpoint import budget_row, run, until


def tls_gauge() -> float | None:
    return REGISTRY.get_sample_value("ampacity_operator_endpoint_tls", {"endpoint": "power"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def operator_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    ca = tls.new_ca("test operator CA")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    (tmp_path / "ca.key").write_bytes(ca.key_pem)
    monkeypatch.setenv(CA_CERT_FILE_ENV, str(tmp_path / "ca.crt"))
    monkeypatch.setenv(CA_KEY_FILE_ENV, str(tmp_path / "ca.key"))
    return tmp_path / "ca.crt"


async def test_an_agent_reports_over_tls_only_to_the_endpoint_its_ca_vouches_for(
    operator_ca: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(endpoint_tls.NAMES_ENV, "ampacity-operator.ampacity-system.svc, 127.0.0.1")
    context = endpoint_tls.serving_context("power", tmp_path / "issued")
    assert context is not None and tls_gauge() == 1
    assert not (tmp_path / "issued" / "tls.key").exists()  # loaded, then removed from disk
    kube = budget_row()
    cache = ClusterCache(kube)
    await cache.start(sync_seconds=5)
    power = PowerRuntime(kube, cache.node_power_informer)
    port = free_port()
    served = await endpoint.start(power, port, host="127.0.0.1", ssl_context=context)
    url = f"https://127.0.0.1:{port}"
    trusting = OperatorLink(url, "n0", ca_file=operator_ca)
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(tls.new_ca("someone else").cert_pem)
    doubting = OperatorLink(url, "n1", ca_file=other_ca)
    try:
        await run(kube, {CACHE_MEMO: cache, POWER_MEMO: power})
        await until(lambda: len(kube.of_kind("NodePower")) == 2, "NodePowers written")
        fleet = [
            Agent(node, SimulatedGpuBackend(2, clock=lambda: 0.0), kube, link=link)
            for node, link in (("n0", trusting), ("n1", doubting))
        ]

        async def step_all() -> None:
            for agent in fleet:
                await agent.step()

        await until(lambda: trusting.latest is not None, "an answer over TLS", step_all)
        for _ in range(5):
            await step_all()
        # The agent whose CA did not sign the endpoint's certificate never got an answer: it keeps
        # to its NodePower on the API server instead.
        assert doubting.latest is None
        assert kube.stored("NodePower", None, "n1")["status"]["gpus"]  # type: ignore[index]
    finally:
        await trusting.close()
        await doubting.close()
        await served.close()
        await power.close()
        await cache.close()


def test_without_names_the_endpoint_is_plain_http_and_says_so(
    operator_ca: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(endpoint_tls.NAMES_ENV, raising=False)
    assert endpoint_tls.serving_context("power") is None
    assert tls_gauge() == 0


def test_names_without_a_readable_ca_stop_the_start_instead_of_serving_plain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(endpoint_tls.NAMES_ENV, "ampacity-operator.ampacity-system.svc")
    monkeypatch.delenv(CA_CERT_FILE_ENV, raising=False)
    monkeypatch.delenv(CA_KEY_FILE_ENV, raising=False)
    with pytest.raises(OperatorCAError, match="no CA"):
        endpoint_tls.serving_context("power")
