"""FederatedRound against the real control plane, a real aggregator process and real client processes.

kwok runs no containers, so the round's aggregator Deployment never runs code here: each test starts
the same `ampacity federated aggregator` command locally with the admin token the operator put in the
round's Secret, and the operator reaches it through AMPACITY_AGGREGATOR_URL_OVERRIDE and the round's
`ampacity.dev/aggregator-port` annotation (see controllers/federatedround/controller.py).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ampacity.dev.cluster.kubectl import Kubectl, condition
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.localcluster import free_port
from ampacity.dev.cluster.polling import wait_for
from ampacity.federated.aggregator import (
    BASE_VERSION_HEADER,
    ROUND_HEADER,
    WEIGHT_HEADER,
    atomic_write,
    decode_arrays,
    encode_arrays,
)
from ampacity.federated.client import FederatedClient
from ampacity.federated.eval import evaluation
from controllers.federatedround.controller import POLL_INTERVAL_ENV, PORT_ANNOTATION, URL_OVERRIDE_ENV

OVERRIDE = "http://127.0.0.1:{port}"
SELECTOR = {"federated.ampacity.dev/population": "digits"}
LABEL = "federated.ampacity.dev/population=digits"
ROUND = "digits"


@pytest.fixture(scope="module")
def fl_operator(operator: LocalOperator) -> Iterator[LocalOperator]:
    """The session's operator, restarted with the aggregator URL override and a 1 s round poll."""
    wanted = {URL_OVERRIDE_ENV: OVERRIDE, POLL_INTERVAL_ENV: "1"}
    if any(operator.env.get(k) != v for k, v in wanted.items()):
        operator.env.update(wanted)
        operator.stop()
        operator.start()
    yield operator
    # Later restarts (other modules) get the operator's defaults back; no need to restart it now.
    for key in wanted:
        operator.env.pop(key, None)


class Processes:
    """Aggregator and client processes of one test, with their logs; all stopped at teardown."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "ampacity.cli", "federated", *args],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.running.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


class Aggregator:
    """`ampacity federated aggregator` on 127.0.0.1, restartable on the same state directory."""

    def __init__(self, processes: Processes, state_dir: Path, port: int, token: str) -> None:
        self.processes, self.state_dir, self.port, self.token = processes, state_dir, port, token
        self.url = f"http://127.0.0.1:{port}"
        self.initial_model = state_dir.parent / "initial-model.npz"
        atomic_write(self.initial_model, encode_arrays(evaluation.model_params(evaluation.initial_model())))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            "aggregator",
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--state-dir={self.state_dir}",
            f"--initial-model={self.initial_model}",
            "--deadline-poll-seconds=0.1",
        ]
        self.process = self.processes.start("aggregator", args, {"AMPACITY_FL_ADMIN_TOKEN": self.token})
        wait_for(self._healthy, timeout=30, what="aggregator healthy")

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"aggregator exited: {self.processes.log('aggregator')}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything that was not already durable."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=10, **kwargs)

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = self.admin("GET", "/v1/status").json()
        return body

    def register(self, client_id: str, labels: dict[str, str]) -> str:
        resp = self.admin("POST", "/v1/clients", json={"client_id": client_id, "labels": labels})
        assert resp.status_code == 201, resp.text
        token: str = resp.json()["token"]
        return token

    def model(self, version: int | None = None) -> dict[str, np.ndarray]:
        params = {} if version is None else {"version": str(version)}
        resp = self.admin("GET", "/v1/model", params=params)
        assert resp.status_code == 200, resp.text
        arrays, _ = decode_arrays(resp.content)
        return arrays


def start_round(
    kubectl: Kubectl, processes: Processes, namespace: str, tmp_path: Path, **spec: Any
) -> Aggregator:
    """Create the FederatedRound, then run its aggregator with the token from the round's Secret."""
    port = free_port()
    manifest = {
        "apiVersion": "ampacity.dev/v1alpha1",
        "kind": "FederatedRound",
        "metadata": {"name": ROUND, "namespace": namespace, "annotations": {PORT_ANNOTATION: str(port)}},
        "spec": {
            "model": "file:///state/global-model.npz",
            "clientSelector": SELECTOR,
            "cohortSize": 3,
            "minQuorum": 3,
            # Rounds close as soon as every selected client delivered; the deadline is a backstop.
            "deadline": "120s",
            "strategy": "fedcompass",
            "localSteps": {"min": 2, "max": 10},
            **spec,
        },
    }
    result = kubectl.apply(manifest)
    assert result.returncode == 0, result.stderr
    secret = wait_for(
        lambda: kubectl.get("secret", f"{ROUND}-aggregator-admin", namespace), timeout=30, what="admin Secret"
    )
    assert secret["metadata"]["ownerReferences"][0]["name"] == ROUND
    token = base64.b64decode(secret["data"]["token"]).decode()
    aggregator = Aggregator(processes, tmp_path / "state", port, token)
    aggregator.start()
    return aggregator


def start_client(
    processes: Processes,
    aggregator: Aggregator,
    client_id: str,
    shard: int,
    *extra: str,
    token: str | None = None,
) -> subprocess.Popen[bytes]:
    args = [
        "client",
        f"--url={aggregator.url}",
        f"--client-id={client_id}",
        f"--shard={shard}",
        "--shards=4",
        f"--label={LABEL}",
        "--poll-seconds=0.2",
        "--timeout-seconds=60",
        *extra,
    ]
    env = {"AMPACITY_FL_CLIENT_TOKEN": token} if token else {"AMPACITY_FL_ADMIN_TOKEN": aggregator.token}
    return processes.start(client_id, args, env)


def round_status(kubectl: Kubectl, namespace: str) -> dict[str, Any]:
    obj = kubectl.get("federatedround", ROUND, namespace) or {}
    status: dict[str, Any] = obj.get("status", {})
    return status


def wait_phase(kubectl: Kubectl, namespace: str, phase: str, timeout: float = 45) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        status = round_status(kubectl, namespace)
        if status.get("phase") == "Failed" and phase != "Failed":
            raise AssertionError(f"round failed: {condition({'status': status})}")
        return status if status.get("phase") == phase else None

    return wait_for(check, timeout=timeout, what=f"FederatedRound {phase}")


def events(kubectl: Kubectl, namespace: str) -> str:
    return kubectl("get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={ROUND}")


def test_round_with_real_clients_completes(
    kubectl: Kubectl, fl_operator: LocalOperator, namespace: str, processes: Processes, tmp_path: Path
) -> None:
    aggregator = start_round(kubectl, processes, namespace, tmp_path, localSteps={"min": 5, "max": 20})
    # A registered client whose labels do not match the selector is never selected.
    aggregator.register("outsider", {"federated.ampacity.dev/population": "other"})
    # phone-0 declares its speed; the two slower devices register what they measure (one timed step
    # plus their delay).
    clients = [
        start_client(processes, aggregator, "phone-0", 0, "--seconds-per-step=0.01"),
        start_client(processes, aggregator, "phone-1", 1, "--step-delay-seconds=0.1"),
        start_client(processes, aggregator, "phone-2", 2, "--step-delay-seconds=0.15"),
    ]

    status = wait_phase(kubectl, namespace, "Completed")
    assert status["selectedClients"] == ["phone-0", "phone-1", "phone-2"]
    assert [a["client"] for a in status["assignments"]] == ["phone-0", "phone-1", "phone-2"]
    assert all(5 <= a["localSteps"] <= 20 and a["secondsPerStep"] > 0 for a in status["assignments"])
    # FedCompass: the fastest client opens a group with Q_max; the next is too slow to do Q_min before
    # that group lands, so it opens a later one with Q_max; the slowest joins that one with fewer
    # steps, so that both land together.
    fastest, middle, slowest = sorted(status["assignments"], key=lambda a: a["secondsPerStep"])
    assert fastest["client"] == "phone-0" and fastest["secondsPerStep"] == 0.01
    assert fastest["localSteps"] == middle["localSteps"] == 20
    assert fastest["group"] != middle["group"] == slowest["group"]
    assert 5 <= slowest["localSteps"] < 20
    assert (status["receivedUpdates"], status["lateUpdates"], status["rejectedUpdates"]) == (3, 0, 0)
    assert status["resultMetrics"]["modelVersion"] == 1 and status["resultMetrics"]["updates"] == 3
    assert status["resultMetrics"]["updateNorm"] > 0
    assert status["result"] == f"http://{ROUND}-aggregator.{namespace}.svc:8443/v1/model?version=1"
    assert status["startTime"] and status["deadlineTime"] and status["completionTime"]
    ready = condition({"status": status})
    assert ready is not None and ready["status"] == "True" and ready["reason"] == "RoundCompleted"
    assert [c.wait(timeout=30) for c in clients] == [0, 0, 0]

    # The result is a trained model: better than the all-zero start (chance) on the held-out digits.
    data = evaluation.load_federated_digits(4, 0.5, 0)
    before = evaluation.accuracy(evaluation.initial_model(), data.test_x, data.test_y)
    after = evaluation.accuracy(
        evaluation.params_vector(aggregator.model(version=1)), data.test_x, data.test_y
    )
    assert after > before, (before, after)
    assert "RoundOpened" in events(kubectl, namespace)
    children = kubectl.json(
        "get", "deployments,services,secrets", "-n", namespace, "-l", f"ampacity.dev/federatedround={ROUND}"
    )
    assert {(o["kind"], o["metadata"]["name"]) for o in children["items"]} == {
        ("Deployment", f"{ROUND}-aggregator"),
        ("Service", f"{ROUND}-aggregator"),
        ("Secret", f"{ROUND}-aggregator-admin"),
    }


def test_straggler_past_the_deadline_does_not_block_the_round(
    kubectl: Kubectl, fl_operator: LocalOperator, namespace: str, processes: Processes, tmp_path: Path
) -> None:
    aggregator = start_round(
        kubectl,
        processes,
        namespace,
        tmp_path,
        cohortSize=4,
        minQuorum=3,
        deadline="5s",
        strategy="fedavg",
        localSteps={"min": 1, "max": 2},
    )
    fast = [start_client(processes, aggregator, f"phone-{i}", i) for i in range(3)]
    # fedavg gives everyone Q_max = 2 steps: 2 x 3 s after it got its task lands after the 5 s deadline.
    straggler = start_client(processes, aggregator, "slowpoke", 3, "--step-delay-seconds=3")

    status = wait_phase(kubectl, namespace, "Completed", timeout=45)
    assert "slowpoke" in status["selectedClients"]
    assert status["receivedUpdates"] == 3
    assert status["resultMetrics"]["updates"] == 3
    ready = condition({"status": status})
    assert ready is not None and "deadline reached" in ready["message"]
    assert [c.wait(timeout=30) for c in fast] == [0, 0, 0]

    # It still delivers; the update is counted late (buffered for a next round), the round stays done.
    late = wait_for(
        lambda: (s := round_status(kubectl, namespace)).get("lateUpdates") == 1 and s, timeout=30, what="late"
    )
    assert late["phase"] == "Completed" and late["receivedUpdates"] == 3
    assert straggler.wait(timeout=30) == 0
    assert "'status': 'late'" in processes.log("slowpoke")
    assert aggregator.status()["late_buffered"] == [f"{late['roundId']}.slowpoke"]


def test_malformed_update_is_rejected_and_does_not_touch_the_aggregate(
    kubectl: Kubectl, fl_operator: LocalOperator, namespace: str, processes: Processes, tmp_path: Path
) -> None:
    aggregator = start_round(
        kubectl,
        processes,
        namespace,
        tmp_path,
        cohortSize=4,
        minQuorum=3,
        deadline="8s",
        strategy="fedavg",
        localSteps={"min": 1, "max": 1},
    )
    labels = dict(SELECTOR)
    tokens = {cid: aggregator.register(cid, labels) for cid in ("good-0", "good-1", "good-2", "mallory")}
    wait_phase(kubectl, namespace, "Training")
    base = aggregator.model(version=0)

    with FederatedClient(aggregator.url, tokens["mallory"]) as mallory:
        task = mallory.fetch_task()
        assert task is not None
        headers = {ROUND_HEADER: task.round_id, BASE_VERSION_HEADER: "0", WEIGHT_HEADER: "1"}
        garbage = mallory.http.post("/v1/updates", content=b"\x00not an npz\xff" * 64, headers=headers)
        assert garbage.status_code == 400
        assert "not a valid .npz archive" in garbage.json()["error"]
        poisoned = {k: np.full(v.shape, np.nan, v.dtype) for k, v in base.items()}
        nan = mallory.upload(task, poisoned, 1.0)
        assert nan.status_code == 422
        assert "NaN or infinite" in nan.body["error"]

    rng = np.random.default_rng(0)
    deltas = {
        cid: {k: rng.normal(0, 0.1, v.shape).astype(v.dtype) for k, v in base.items()} for cid in tokens
    }
    weights = {"good-0": 10.0, "good-1": 20.0, "good-2": 30.0}
    for cid, weight in weights.items():
        with FederatedClient(aggregator.url, tokens[cid]) as client:
            task = client.fetch_task()
            assert task is not None
            assert client.upload(task, deltas[cid], weight).accepted

    status = wait_phase(kubectl, namespace, "Completed", timeout=30)
    assert (status["receivedUpdates"], status["rejectedUpdates"]) == (3, 2)
    reasons = [r["reason"] for r in status["rejections"]]
    assert {r["client"] for r in status["rejections"]} == {"mallory"}
    assert any("not a valid .npz archive" in r for r in reasons) and any("NaN" in r for r in reasons)
    assert "UpdateRejected" in events(kubectl, namespace)

    # The aggregate is exactly the weighted mean of the three good deltas.
    total = sum(weights.values())
    expected = {
        k: (base[k].astype(np.float64) + sum(w * deltas[c][k] for c, w in weights.items()) / total).astype(
            base[k].dtype
        )
        for k in base
    }
    got = aggregator.model(version=1)
    for k in base:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)
    resp = aggregator.admin("GET", "/v1/model", params={"version": "0"})
    assert resp.status_code == 404 and "not the current one" in resp.json()["error"]


def test_aggregator_restart_mid_round_keeps_received_updates(
    kubectl: Kubectl, fl_operator: LocalOperator, namespace: str, processes: Processes, tmp_path: Path
) -> None:
    aggregator = start_round(
        kubectl, processes, namespace, tmp_path, strategy="fedavg", localSteps={"min": 2, "max": 2}
    )
    late_token = aggregator.register("phone-2", dict(SELECTOR))
    early = [start_client(processes, aggregator, f"phone-{i}", i) for i in range(2)]
    assert [c.wait(timeout=45) for c in early] == [0, 0]
    before = aggregator.status()["round"]
    assert sorted(before["accepted"]) == ["phone-0", "phone-1"] and before["phase"] == "Training"
    wait_for(
        lambda: round_status(kubectl, namespace).get("receivedUpdates") == 2, timeout=20, what="2 received"
    )

    aggregator.kill()
    unreachable = wait_for(
        lambda: (
            (c := condition({"status": round_status(kubectl, namespace)}))
            and c["reason"] == "AggregatorUnreachable"
        ),
        timeout=20,
        what="operator notices the aggregator is gone",
    )
    assert unreachable
    aggregator.start()
    after = aggregator.status()["round"]
    assert after["spec"]["round_id"] == before["spec"]["round_id"]
    assert sorted(after["accepted"]) == ["phone-0", "phone-1"] and after["phase"] == "Training"

    last = start_client(processes, aggregator, "phone-2", 2, token=late_token)
    status = wait_phase(kubectl, namespace, "Completed", timeout=45)
    assert status["receivedUpdates"] == 3 and status["resultMetrics"]["updates"] == 3
    assert last.wait(timeout=30) == 0


def test_api_server_rejects_a_rule_the_quorum_cannot_support(
    kubectl: Kubectl, crds: None, namespace: str
) -> None:
    manifest = {
        "apiVersion": "ampacity.dev/v1alpha1",
        "kind": "FederatedRound",
        "metadata": {"name": "bad", "namespace": namespace},
        "spec": {
            "model": "file:///state/m.npz",
            "cohortSize": 5,
            "minQuorum": 4,
            "deadline": "1m",
            "aggregation": {"rule": "multiKrum", "byzantineClients": 1},
        },
    }
    result = kubectl.apply(manifest)
    assert result.returncode != 0
    assert "krum and multiKrum need minQuorum > 2 * byzantineClients + 2" in result.stderr
    manifest["spec"]["minQuorum"] = 5
    assert kubectl.apply(manifest).returncode == 0
