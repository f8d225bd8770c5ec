"""FederatedRound against the real control plane, a real aggregator process and real client processes.

kwok runs no containers, so the round's aggregator Deployment never runs code here: each test plays
the kubelet, starting the same `ampacity federated aggregator` command locally with what the operator
put in the round's Secrets (admin token, TLS key and certificate, enrolment token), and the operator
reaches it over HTTPS through AMPACITY_AGGREGATOR_URL_OVERRIDE and the round's
`ampacity.dev/aggregator-port` annotation (see controllers/federatedround/controller.py), verifying
it against its CA with the Service's name. Clients enrol with the enrolment token only.
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
from ampacity.federated import tls
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
from controllers.federatedround.controller import (
    CA_CERT_FILE_ENV,
    CA_KEY_FILE_ENV,
    POLL_INTERVAL_ENV,
    PORT_ANNOTATION,
    URL_OVERRIDE_ENV,
)

OVERRIDE = "https://127.0.0.1:{port}"
EXAMPLES = Path(__file__).parents[2] / "examples"
SELECTOR = {"federated.ampacity.dev/population": "digits"}
LABEL = "federated.ampacity.dev/population=digits"
ROUND = "digits"
#: The name on the aggregator's certificate (the Service's); the tests reach it at 127.0.0.1.
SERVER_NAME = f"{ROUND}-aggregator"


@pytest.fixture(scope="module")
def fl_operator(operator: LocalOperator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalOperator]:
    """The session's operator, restarted with its CA, the aggregator URL override and a 1 s round poll."""
    ca_dir = tmp_path_factory.mktemp("operator-ca")
    ca = tls.new_ca("operator's federated CA")
    (ca_dir / "ca.crt").write_bytes(ca.cert_pem)
    (ca_dir / "ca.key").write_bytes(ca.key_pem)
    wanted = {
        URL_OVERRIDE_ENV: OVERRIDE,
        POLL_INTERVAL_ENV: "1",
        CA_CERT_FILE_ENV: str(ca_dir / "ca.crt"),
        CA_KEY_FILE_ENV: str(ca_dir / "ca.key"),
    }
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
                cwd=EXAMPLES.parent,
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
    """`ampacity federated aggregator` on 127.0.0.1 over HTTPS, restartable on the same state directory.

    `secrets` is what the pod would mount: the admin token, the enrolment token, the TLS Secret's files.
    """

    def __init__(self, processes: Processes, state_dir: Path, port: int, secrets: dict[str, str]) -> None:
        self.processes, self.state_dir, self.port = processes, state_dir, port
        self.token, self.enrolment_token = secrets["admin"], secrets["enrolment"]
        self.tls_dir = state_dir.parent / "tls"
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        for name in ("tls.crt", "tls.key", "ca.crt"):
            (self.tls_dir / name).write_text(secrets[name])
        self.ca_file = self.tls_dir / "ca.crt"
        self.verify = tls.client_context(self.ca_file)
        self.url = f"https://127.0.0.1:{port}"
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
            f"--tls-cert={self.tls_dir / 'tls.crt'}",
            f"--tls-key={self.tls_dir / 'tls.key'}",
        ]
        env = {"AMPACITY_FL_ADMIN_TOKEN": self.token, "AMPACITY_FL_ENROLMENT_TOKEN": self.enrolment_token}
        self.process = self.processes.start("aggregator", args, env)
        wait_for(self._healthy, timeout=30, what="aggregator healthy")

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"aggregator exited: {self.processes.log('aggregator')}")
        try:
            return self.admin("GET", "/healthz").status_code == 200
        except httpx.TransportError as error:
            if "CERTIFICATE" in str(error):
                raise
            return False

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything that was not already durable."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(verify=self.verify, timeout=10) as http:
            return http.request(
                method,
                f"{self.url}{path}",
                headers=headers,
                extensions={"sni_hostname": SERVER_NAME},
                **kwargs,
            )

    def client(self, token: str) -> FederatedClient:
        return FederatedClient(self.url, token, ca_file=self.ca_file, server_name=SERVER_NAME)

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

    def secret(suffix: str) -> dict[str, str]:
        found = wait_for(
            lambda: kubectl.get("secret", f"{ROUND}-aggregator-{suffix}", namespace),
            timeout=30,
            what=f"{suffix} Secret",
        )
        assert found["metadata"]["ownerReferences"][0]["name"] == ROUND
        return {k: base64.b64decode(v).decode() for k, v in found["data"].items()}

    issued = secret("tls")
    secrets = {"admin": secret("admin")["token"], "enrolment": secret("enrolment")["token"], **issued}
    assert secret("enrolment")["ca.crt"] == issued["ca.crt"]
    aggregator = Aggregator(processes, tmp_path / "state", port, secrets)
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
    args = ["client", f"--shard={shard}", "--shards=4", *client_args(aggregator, client_id), *extra]
    return processes.start(client_id, args, client_env(aggregator, token))


def client_args(aggregator: Aggregator, client_id: str) -> list[str]:
    return [
        f"--url={aggregator.url}",
        f"--ca-file={aggregator.ca_file}",
        f"--server-name={SERVER_NAME}",
        f"--client-id={client_id}",
        f"--label={LABEL}",
        "--poll-seconds=0.2",
        "--timeout-seconds=60",
    ]


def client_env(aggregator: Aggregator, token: str | None = None) -> dict[str, str]:
    """A client holds the enrolment token, never the admin token (and its own, if given one)."""
    env = {"AMPACITY_FL_ENROLMENT_TOKEN": aggregator.enrolment_token}
    return {**env, "AMPACITY_FL_CLIENT_TOKEN": token} if token else env


def wait_enrolled(aggregator: Aggregator, count: int) -> None:
    """Until `count` clients enrolled: a client process's start (numpy, the data, one timed step)
    takes seconds, much longer on a loaded machine; the round's own timing starts after it."""
    wait_for(
        lambda: len(aggregator.status()["clients"]) >= count, timeout=180, what=f"{count} clients enrolled"
    )


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

    try:
        return wait_for(check, timeout=timeout, what=f"FederatedRound {phase}")
    except TimeoutError as error:
        status = round_status(kubectl, namespace)
        raise AssertionError(
            f"{error}; phase {status.get('phase')}: {condition({'status': status})}"
        ) from error


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
    wait_enrolled(aggregator, 4)  # with the outsider

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
    assert status["result"] == f"https://{ROUND}-aggregator.{namespace}.svc:8443/v1/model?version=1"
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
        ("Secret", f"{ROUND}-aggregator-enrolment"),
        ("Secret", f"{ROUND}-aggregator-tls"),
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
    wait_enrolled(aggregator, 4)

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

    with aggregator.client(tokens["mallory"]) as mallory:
        task = mallory.fetch_task()
        assert task is not None
        headers = {ROUND_HEADER: task.round_id, BASE_VERSION_HEADER: "0", WEIGHT_HEADER: "1"}
        garbage = mallory.http.post(
            "/v1/updates",
            content=b"\x00not an npz\xff" * 64,
            headers=headers,
            extensions={"sni_hostname": SERVER_NAME},
        )
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
        with aggregator.client(tokens[cid]) as client:
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
    wait_enrolled(aggregator, 3)  # with phone-2, enrolled above
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


def test_five_round_run_with_a_flower_client_survives_an_aggregator_kill(
    kubectl: Kubectl, fl_operator: LocalOperator, namespace: str, processes: Processes, tmp_path: Path
) -> None:
    rounds = 5
    aggregator = start_round(
        kubectl,
        processes,
        namespace,
        tmp_path,
        rounds=rounds,
        strategy="fedavg",
        localSteps={"min": 5, "max": 5},
        # The final model stays on the claim, so the aggregator is removed once the run ends.
        aggregator={"stateVolumeClaim": "fl-state"},
    )
    many = [f"--tasks={rounds}", "--timeout-seconds=480"]
    clients = [
        start_client(processes, aggregator, "phone-0", 0, *many),
        # The slow one keeps each round open for about 2 s: time to kill the aggregator mid-round.
        start_client(processes, aggregator, "phone-1", 1, "--step-delay-seconds=0.4", *many),
        processes.start(
            "flower-0",
            [
                "flower-client",
                "--client=examples/flower_digits.py:make_client",
                "--client-arg=shard=2",
                "--client-arg=shards=4",
                *client_args(aggregator, "flower-0"),
                *many,
            ],
            client_env(aggregator),
        ),
    ]

    # Mid-run: round 3 open at the aggregator with at least one acknowledged update.
    def mid_round() -> dict[str, Any] | None:
        record = aggregator.status()["round"]
        third = record and record["spec"]["round_id"].endswith("-3") and record["phase"] == "Training"
        return record if third and record["accepted"] else None

    wait_enrolled(aggregator, 3)
    before = wait_for(mid_round, timeout=240, what="round 3 open with an accepted update")
    table = kubectl("get", "federatedround", ROUND, "-n", namespace)
    assert "ROUND" in table.splitlines()[0] and "ROUNDS" in table.splitlines()[0]
    aggregator.kill()
    aggregator.start()
    after = aggregator.status()["round"]
    assert after["spec"]["round_id"] == before["spec"]["round_id"]
    assert set(before["accepted"]) <= set(after["accepted"]), "an acknowledged update was lost"

    status = wait_phase(kubectl, namespace, "Completed", timeout=300)
    assert [c.wait(timeout=60) for c in clients] == [0, 0, 0], [
        processes.log(n) for n in ("phone-0", "phone-1", "flower-0")
    ]
    assert status["currentRound"] == rounds and status["completedRounds"] == rounds
    history = status["history"]
    assert [h["round"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["modelVersion"] for h in history] == [1, 2, 3, 4, 5]
    assert all(h["phase"] == "Completed" and h["participants"] == 3 and not h["stragglers"] for h in history)
    assert all(h["rejectedUpdates"] == 0 for h in history)
    # Both kinds of client report held-out accuracy; the model gets better over the run.
    assert all(0 < h["accuracy"] <= 1 for h in history)
    data = evaluation.load_federated_digits(4, 0.5, 0)
    before = evaluation.accuracy(evaluation.initial_model(), data.test_x, data.test_y)
    final = evaluation.accuracy(
        evaluation.params_vector(aggregator.model(version=rounds)), data.test_x, data.test_y
    )
    assert final > before, (before, final)
    assert "'status': 'accepted'" in processes.log("flower-0")

    # The run ended: its aggregator Deployment and Service are gone, the model is named on the claim.
    removed = wait_for(
        lambda: (s := round_status(kubectl, namespace)).get("aggregatorRemoved") and s,
        timeout=30,
        what="cleanup",
    )
    assert removed["result"] == f"file:///state/models/global-v{rounds}.npz"
    left = kubectl.json(
        "get", "deployments,services", "-n", namespace, "-l", f"ampacity.dev/federatedround={ROUND}"
    )
    assert left["items"] == []
    assert "AggregatorRemoved" in events(kubectl, namespace)
