"""TLS: the aggregator serves HTTPS with a certificate from the operator's CA; clients verify it."""

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from cryptography import x509
from prometheus_client import CollectorRegistry

from ampacity.dev.cluster.localcluster import free_port
from ampacity.dev.cluster.polling import wait_for
from ampacity.federated import tls
from ampacity.federated.aggregator import AggregatorConfig, create_app, encode_arrays
from ampacity.federated.client import FederatedClient, enrol

ADMIN = "admin"
ENROLMENT = "enrol"
SERVICE = "r1-aggregator.ns.svc"


def write_pair(pair: tls.KeyPair, directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    return cert, key


@asynccontextmanager
async def https_aggregator(tmp_path: Path, names: list[str]) -> AsyncIterator[tuple[str, Path]]:
    """An aggregator serving HTTPS with a certificate for `names`; yields its URL and the CA file."""
    ca = tls.new_ca("test federated CA")
    ca_file, _ = write_pair(ca, tmp_path, "ca")
    cert, key = write_pair(tls.issue_server_cert(ca, names), tmp_path, "server")
    app = create_app(
        AggregatorConfig(tmp_path / "state", ADMIN, enrolment_token=ENROLMENT), CollectorRegistry()
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=tls.server_context(cert, key))
    try:
        yield f"https://127.0.0.1:{server.port}", ca_file
    finally:
        await server.close()


def test_certificate_names_the_service_and_chains_to_the_ca() -> None:
    ca = tls.new_ca("ca")
    issued = tls.issue_server_cert(ca, [SERVICE, "127.0.0.1"])
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [SERVICE]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cert.issuer == x509.load_pem_x509_certificate(ca.cert_pem).subject
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))
    with pytest.raises(ValueError, match="at least one name"):
        tls.issue_server_cert(ca, [])


async def test_client_sdk_verifies_the_aggregator_against_the_ca(tmp_path: Path) -> None:
    async with https_aggregator(tmp_path, [SERVICE]) as (url, ca_file):
        async with httpx.AsyncClient(base_url=url, verify=tls.client_context(ca_file)) as admin:
            put = await admin.put(
                "/v1/model",
                content=encode_arrays({"w": np.zeros(2, np.float32)}),
                headers={"Authorization": f"Bearer {ADMIN}"},
                extensions={"sni_hostname": SERVICE},
            )
            assert put.status_code == 200

        def enrol_and_fetch(**tls_args: object) -> int:
            token = enrol(url, ENROLMENT, "a", credential_file=tmp_path / "a.token", **tls_args)  # type: ignore[arg-type]
            with FederatedClient(url, token, **tls_args) as client:  # type: ignore[arg-type]
                version, _ = client.fetch_model()
                return version

        # Verified against the CA, with the Service's name (the URL's host is a port-forward).
        assert await asyncio.to_thread(enrol_and_fetch, ca_file=ca_file, server_name=SERVICE) == 0
        # The name is checked: the certificate is not for 127.0.0.1.
        with pytest.raises(httpx.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|match"):
            await asyncio.to_thread(enrol_and_fetch, ca_file=ca_file)
        # Without the CA (the system's trust store) the aggregator's certificate is not trusted.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await asyncio.to_thread(enrol_and_fetch, server_name=SERVICE)
        # Another CA's certificate for the right name is refused too.
        other_ca, _ = write_pair(tls.new_ca("someone else"), tmp_path, "other")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await asyncio.to_thread(enrol_and_fetch, ca_file=other_ca, server_name=SERVICE)


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ampacity.cli", "federated", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_aggregator_cli_serves_tls_or_plain_http_only_when_asked(tmp_path: Path) -> None:
    env = {"AMPACITY_FL_ADMIN_TOKEN": ADMIN}
    refused = run_cli("aggregator", f"--state-dir={tmp_path / 's'}", "--port=1", env=env)
    assert refused.returncode != 0 and "--insecure-http" in refused.stderr
    half = run_cli("aggregator", f"--state-dir={tmp_path / 's'}", f"--tls-cert={tmp_path}/x", env=env)
    assert half.returncode != 0 and "go together" in half.stderr
    ca = tls.new_ca("cli CA")
    ca_file, _ = write_pair(ca, tmp_path, "ca")
    cert, key = write_pair(tls.issue_server_cert(ca, [SERVICE]), tmp_path, "server")
    port = free_port()
    args = [f"--state-dir={tmp_path / 's'}", "--host=127.0.0.1", f"--port={port}"]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ampacity.cli",
            "federated",
            "aggregator",
            *args,
            f"--tls-cert={cert}",
            f"--tls-key={key}",
        ],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        verify = tls.client_context(ca_file)

        def healthy() -> bool:
            if process.poll() is not None:
                raise AssertionError("the aggregator exited")
            try:
                with httpx.Client(verify=verify) as http:
                    resp = http.get(f"https://127.0.0.1:{port}/healthz", extensions={"sni_hostname": SERVICE})
                return resp.status_code == 200
            except httpx.ConnectError as error:
                if "CERTIFICATE" in str(error) or "SSL" in str(error):
                    raise
                return False

        wait_for(healthy, timeout=60, what="the aggregator serving HTTPS")
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)  # no plain HTTP beside it
    finally:
        process.kill()
        process.wait(timeout=10)
