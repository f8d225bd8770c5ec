"""TLS for the operator's power telemetry endpoint: node agents reach it across the cluster network.

The operator already holds a CA (the chart's, mounted as files; `federatedround.operator_ca`) and
issues aggregators their certificates from it. It issues itself one the same way at start-up, for
the names of its Service (`AMPACITY_ENDPOINT_NAMES`, set by the chart), and agents verify it with
the CA's certificate, which the chart publishes in a ConfigMap in the agents' namespace. Without
names configured (a local run) the endpoint serves plain HTTP and says so: a warning in the log and
`ampacity_operator_endpoint_tls` at 0. Names configured but no CA readable is a start-up error, not
a silent downgrade.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from pathlib import Path

from ampacity.federated import tls
from controllers import metrics
from controllers.federatedround.controller import operator_ca

#: Comma-separated DNS names the operator's endpoints are reached by (its Service's names).
NAMES_ENV = "AMPACITY_ENDPOINT_NAMES"

log = logging.getLogger(__name__)


def endpoint_names() -> list[str]:
    return [name.strip() for name in os.environ.get(NAMES_ENV, "").split(",") if name.strip()]


def serving_context(endpoint: str, directory: Path | None = None) -> ssl.SSLContext | None:
    """The TLS context `endpoint` serves with, from a certificate issued now by the operator's CA;
    None (plain HTTP, reported) when no names are configured. Raises `OperatorCAError` when names
    are configured but the CA cannot be read."""
    names = endpoint_names()
    if not names:
        log.warning("the %s endpoint serves plain HTTP: %s is unset", endpoint, NAMES_ENV)
        metrics.ENDPOINT_TLS.labels(endpoint).set(0)
        return None
    issued = tls.issue_server_cert(operator_ca(), names)
    # ssl loads certificates from files only: a private directory that lives as long as the process.
    folder = Path(directory or tempfile.mkdtemp(prefix=f"ampacity-{endpoint}-tls-"))
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_file, key_file = folder / "tls.crt", folder / "tls.key"
    cert_file.write_bytes(issued.cert_pem)
    key_file.touch(mode=0o600)
    key_file.write_bytes(issued.key_pem)
    context = tls.server_context(cert_file, key_file)
    key_file.unlink()  # loaded: the key need not stay on disk
    metrics.ENDPOINT_TLS.labels(endpoint).set(1)
    log.info("the %s endpoint serves TLS for %s", endpoint, ", ".join(names))
    return context
