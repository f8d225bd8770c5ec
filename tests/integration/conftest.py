"""Fixtures for tests against the real local control plane.

One cluster (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
kwok with fake GPU nodes) and one operator process serve the whole session;
each test gets its own namespace.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ampacity.dev.cluster.binaries import ensure_binaries
from ampacity.dev.cluster.kubectl import Kubectl, install_crds
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.localcluster import LocalCluster
from ampacity.dev.cluster.polling import wait_for

REPO = Path(__file__).resolve().parents[2]
GPU_NODES = 4


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[LocalCluster]:
    # The first run builds the control plane (20-40 min): its progress and heartbeat go to the
    # terminal, not into pytest's capture, so a long build does not look like a hang.
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        ensure_binaries()
    local = LocalCluster(
        tmp_path_factory.mktemp("cluster"), progress=lambda m: print(f"[cluster] {m}", file=sys.stderr)
    )
    local.up(nodes=GPU_NODES)
    try:
        yield local
    finally:
        local.down()


@pytest.fixture(scope="session")
def kubectl(cluster: LocalCluster) -> Kubectl:
    return Kubectl(cluster.kubeconfig)


@pytest.fixture(scope="session")
def crds(kubectl: Kubectl) -> None:
    install_crds(kubectl, REPO / "crds")


@pytest.fixture(scope="session")
def operator(
    cluster: LocalCluster, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalOperator]:
    process = LocalOperator(cluster.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    # Pods are admitted only once the controller-manager has created the default ServiceAccount.
    wait_for(
        lambda: kubectl.ok("get", "serviceaccount", "default", "-n", name), timeout=30, what="default SA"
    )
    yield name
    if os.environ.get("AMPACITY_KEEP_NAMESPACES") != "1":
        kubectl.run("delete", "namespace", name, "--wait=false")
