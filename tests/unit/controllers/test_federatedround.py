"""The FederatedRound controller's decisions, and one lifecycle against an in-process aggregator."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import kopf
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from cryptography import x509
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from ampacity.api import FEDERATED_ROUND
from ampacity.api.federatedround import FederatedRoundSpec, FederatedRoundStatus, RoundPhase
from ampacity.cli import build_parser
from ampacity.federated import cli as fed_cli
from ampacity.federated import tls
from ampacity.federated.aggregator import AggregatorConfig, create_app, decode_arrays, encode_arrays
from ampacity.federated.client import FederatedClient
from ampacity.federated.wire import ClientInfo, RoundRecord
from controllers.federatedround import controller as fr
from controllers.federatedround.aggregator_client import AggregatorClient, AggregatorUnavailable
from controllers.reconciler import Context
from tests.fakes import FakeKube

ADMIN = "admin-token"
MODEL = {"w": np.zeros((2, 3), np.float32)}


def spec(**overrides: Any) -> FederatedRoundSpec:
    raw: dict[str, Any] = {
        "model": "file:///state/global-model.npz",
        "cohortSize": 3,
        "minQuorum": 2,
        "deadline": "60s",
        "clientSelector": {"pop": "digits"},
        "localSteps": {"min": 2, "max": 20},
    }
    raw.update(overrides)
    return FederatedRoundSpec.model_validate(raw)


def context(round_spec: FederatedRoundSpec, annotations: dict[str, str] | None = None) -> Context:
    body = kopf.Body(
        {
            "apiVersion": "ampacity.dev/v1alpha1",
            "kind": "FederatedRound",
            "metadata": {
                "name": "r1",
                "namespace": "ns",
                "uid": "1234abcd-0000-1111",
                "generation": 1,
                "annotations": annotations or {},
            },
            "spec": round_spec.to_api(),
        }
    )
    return Context(FEDERATED_ROUND, body, round_spec, FederatedRoundStatus(), kube=FakeKube(), logger=None)


def clients(**speeds: float | None) -> dict[str, ClientInfo]:
    return {c: ClientInfo(labels={"pop": "digits"}, seconds_per_step=s) for c, s in speeds.items()}


# -- children ------------------------------------------------------------------------------------


def test_aggregator_runs_the_real_cli_with_the_token_from_the_secret() -> None:
    ctx = context(spec(aggregator={"stateVolumeClaim": "fl-state"}))
    deployment = fr.aggregator_deployment(ctx, ctx.spec)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert args.func.__name__ == "_aggregator"
    assert args.port == fr.AGGREGATOR_PORT
    assert str(args.state_dir) == "/state"
    assert str(args.initial_model) == "/state/global-model.npz"
    assert container["env"] == [
        {
            "name": "AMPACITY_FL_ADMIN_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "r1-aggregator-admin", "key": "token"}},
        },
        {
            "name": "AMPACITY_FL_ENROLMENT_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "r1-aggregator-enrolment", "key": "token"}},
        },
    ]
    # HTTPS by default, with the key and certificate from the round's TLS Secret.
    assert (str(args.tls_cert), str(args.tls_key), args.insecure_http) == (
        "/tls/tls.crt",
        "/tls/tls.key",
        False,
    )
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert container["ports"] == [{"name": "https", "containerPort": fr.AGGREGATOR_PORT}]
    assert fr.aggregator_service(ctx, ctx.spec)["spec"]["ports"][0]["targetPort"] == "https"
    tls_volume = {"name": "tls", "secret": {"secretName": "r1-aggregator-tls"}}
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert volumes == [{"name": "state", "persistentVolumeClaim": {"claimName": "fl-state"}}, tls_volume]
    no_claim = fr.aggregator_deployment(ctx, spec())["spec"]["template"]["spec"]["volumes"]
    assert no_claim == [{"name": "state", "emptyDir": {}}, tls_volume]
    plain = fr.aggregator_deployment(ctx, spec(aggregator={"insecureHTTP": True}))["spec"]["template"]["spec"]
    plain_args = build_parser().parse_args(plain["containers"][0]["args"])
    assert plain_args.insecure_http and plain_args.tls_cert is None
    assert plain["volumes"] == [{"name": "state", "emptyDir": {}}]
    assert plain["containers"][0]["ports"][0]["name"] == "http"


def test_admin_secret_holds_the_derived_token_and_is_owned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMPACITY_TOKEN_KEY", "operator-key")
    ctx = context(spec())
    token = fr.admin_token(ctx)
    assert token == fr.admin_token(context(spec())), "the same round always gets the same token"
    monkeypatch.setenv("AMPACITY_TOKEN_KEY", "another-key")
    assert fr.admin_token(ctx) != token, "the token depends on the operator key"
    secret = fr.admin_secret(ctx, token)
    assert secret["metadata"]["name"] == "r1-aggregator-admin"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "1234abcd-0000-1111"
    assert base64.b64decode(secret["data"]["token"]).decode() == token


def test_model_path_only_for_file_uris() -> None:
    assert fr.model_path("file:///state/m%20v1.npz") == "/state/m v1.npz"
    assert fr.model_path("s3://bucket/m.npz") is None
    assert fr.model_path("file://elsewhere/m.npz") is None


def test_operator_url_override_template() -> None:
    assert fr.operator_url("r1", "ns", {}, None) == "https://r1-aggregator.ns.svc:8443"
    assert fr.operator_url("r1", "ns", {}, None, insecure_http=True) == "http://r1-aggregator.ns.svc:8443"
    template = "http://127.0.0.1:{port}/"
    assert fr.operator_url("r1", "ns", {fr.PORT_ANNOTATION: "18470"}, template) == "http://127.0.0.1:18470"
    assert fr.operator_url("r1", "ns", {}, template) == "http://127.0.0.1:8443"
    assert (
        fr.operator_url("r1", "ns", {}, "http://{service}.{namespace}:{port}")
        == "http://r1-aggregator.ns:8443"
    )
    with pytest.raises(ValueError, match="port number"):
        fr.operator_url("r1", "ns", {fr.PORT_ANNOTATION: "http://evil"}, template)
    with pytest.raises(ValueError, match="not a template"):
        fr.operator_url("r1", "ns", {}, "http://{host}:{port}")


def test_round_id_differs_for_a_recreated_round() -> None:
    assert fr.round_id("r1", "1234abcd-0000") == "r1-1234abcd"
    assert fr.round_id("r1", "1234abcd-0000", 2) == "r1-1234abcd-2"
    assert fr.round_id("r1", "99990000-0000") != fr.round_id("r1", "1234abcd-0000")


# -- planning ------------------------------------------------------------------------------------


def test_waits_for_enough_matching_clients() -> None:
    registered = clients(a=1.0, b=1.0) | {"x": ClientInfo(labels={"pop": "other"}, seconds_per_step=1.0)}
    plan = fr.plan_round(spec(), "r1-1", registered, None, 0, 7)
    assert isinstance(plan, fr.Waiting)
    assert plan.reason == "AwaitingClients"
    assert "2 of 3 clients" in plan.message and "pop=digits" in plan.message


def test_fedcompass_gives_fast_clients_more_steps_and_fits_the_deadline() -> None:
    registered = clients(fast=0.1, mid=0.5, slow=10.0, none=None) | {"x": ClientInfo()}
    plan = fr.plan_round(spec(cohortSize=4, deadline="60s"), "r1-1", registered, None, 0, 7)
    assert isinstance(plan, fr.RoundPlan)
    assert plan.selected == ("fast", "mid", "none", "slow")
    steps = {a.client: a.local_steps for a in plan.assignments}
    assert steps["fast"] == 20  # Q_max: it opens the first group
    assert steps["fast"] > steps["mid"] >= 2
    # slow: Q_max would take 200 s; 60 s / (10 s x 1.2) = 5 steps fit the deadline.
    assert steps["slow"] == 5
    assert {a.client: a.seconds_per_step for a in plan.assignments}["none"] == 0
    body = plan.body.model_dump(mode="json")
    assert body["clients"] == {c: {"local_steps": n} for c, n in steps.items()}
    assert body["min_quorum"] == 2 and body["deadline_seconds"] == 60.0 and body["rule"] == "mean"
    assert body["close_when_complete"] is True


def test_fedavg_assigns_q_max_to_everyone_and_passes_the_rule() -> None:
    # minQuorum 3: Krum needs more than 2f + 2 updates, which the API server checks.
    round_spec = spec(
        strategy="fedavg",
        minQuorum=3,
        aggregation={"rule": "multiKrum", "byzantineClients": 0, "maxUpdateNorm": 5},
    )
    plan = fr.plan_round(round_spec, "r1-1", clients(a=0.1, b=3.0, c=None), None, 0, 7)
    assert isinstance(plan, fr.RoundPlan)
    assert {a.local_steps for a in plan.assignments} == {20}
    assert plan.body.rule == "multiKrum" and plan.body.max_norm == 5.0


def test_selection_is_reproducible_and_respects_the_cohort_size() -> None:
    registered = clients(**{f"c{i}": 1.0 for i in range(10)})
    first = fr.plan_round(spec(), "r1-1", registered, None, 3, 7)
    again = fr.plan_round(spec(), "r1-1", dict(reversed(registered.items())), None, 3, 7)
    assert isinstance(first, fr.RoundPlan) and isinstance(again, fr.RoundPlan)
    assert first.selected == again.selected and len(first.selected) == 3


def test_speed_estimates_fold_in_last_rounds_reports() -> None:
    last = record(
        reports={"a": {"elapsed_s": 10.0, "local_steps": 5}, "gone": {"elapsed_s": 1, "local_steps": 1}}
    )
    estimates = fr.speed_estimates(clients(a=1.0, b=None), last)
    assert estimates["a"].seconds_per_step == pytest.approx(0.9 * 2.0 + 0.1 * 1.0)
    assert estimates["a"].samples == 2
    assert "b" not in estimates and "gone" not in estimates


# -- following ----------------------------------------------------------------------------------


def record(**overrides: Any) -> RoundRecord:
    raw: dict[str, Any] = {
        "spec": {"round_id": "r1-1", "clients": {"a": {}, "b": {}, "c": {}}},
        "opened_unix_s": 1_000.0,
        "deadline_unix_s": 1_060.0,
        "base_version": 0,
        "phase": "Training",
        "accepted": ["a"],
        "late": [],
        "rejected": [{"client_id": "c", "reason": f"bad {i}"} for i in range(12)],
        "result": None,
        "message": "",
    }
    raw.update(overrides)
    return RoundRecord.model_validate(raw)


def result(version: int, **overrides: Any) -> dict[str, Any]:
    raw = {
        "version": version,
        "accepted": 2,
        "late_included": 0,
        "rule": "mean",
        "update_norm": 0.5,
        "weight": 7,
    }
    return {**raw, **overrides}


def test_a_misspelt_key_in_the_wire_contract_is_an_error() -> None:
    with pytest.raises(ValidationError, match="late_includd"):
        record(result={**result(1), "late_includd": 1})
    with pytest.raises(ValidationError, match="min_quroum"):
        fr.RoundSpec.model_validate({"round_id": "r", "clients": {"a": {}}, "min_quroum": 2})


def test_view_maps_counts_times_and_keeps_the_newest_rejections() -> None:
    view = fr.view_round(record())
    assert view.phase == RoundPhase.TRAINING
    assert (view.received, view.late, view.rejected) == (1, 0, 12)
    assert [r.reason for r in view.rejections] == [f"bad {i}" for i in range(2, 12)]
    assert view.start_time == datetime.fromtimestamp(1_000, UTC)
    assert view.missing == ("b", "c")


def test_view_of_a_completed_round_has_its_result() -> None:
    view = fr.view_round(
        record(phase="Completed", accepted=["a", "b"], late=["c"], result=result(4, late_included=1))
    )
    assert view.phase == RoundPhase.COMPLETED
    assert view.result is not None and view.result.model_version == 4 and view.result.late_included == 1
    assert view.missing == ()


def test_apply_view_sets_ready_result_and_events() -> None:
    ctx = context(spec())
    now = datetime(2026, 1, 1, tzinfo=UTC)
    fr.apply_view(
        ctx, ctx.status, fr.view_round(record(rejected=[{"client_id": "c", "reason": "NaN"}])), "u", now
    )
    assert ctx.status.condition("Ready").reason == "Training"
    assert ctx.events == [("Warning", "UpdateRejected", "update from c rejected: NaN")]
    done = record(phase="Completed", accepted=["a", "b"], late=["c"], result=result(1), message="deadline")
    fr.apply_view(ctx, ctx.status, fr.view_round(done), "http://agg", now)
    assert ctx.status.phase == RoundPhase.COMPLETED
    assert ctx.status.result == "http://agg/v1/model?version=1"
    assert ctx.status.completion_time == now
    ready = ctx.status.condition("Ready")
    assert ready.status == "True" and ready.reason == "RoundCompleted" and "1 late" in ready.message
    assert ctx.events[-1][1] == "LateUpdates"


def test_ended_round_is_followed_only_while_a_client_may_still_deliver_late() -> None:
    status = FederatedRoundStatus(
        phase=RoundPhase.COMPLETED, round_id="r1-1", selected_clients=["a", "b", "c"], received_updates=2
    )
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert not fr.follow_after_end(status, spec(), now)  # no completion time yet
    status.completion_time = now
    assert fr.follow_after_end(status, spec(), now + timedelta(seconds=30))
    assert not fr.follow_after_end(status, spec(), now + timedelta(seconds=61))
    status.late_updates = 1
    assert not fr.follow_after_end(status, spec(), now + timedelta(seconds=30))


def test_controller_closes_only_long_after_the_deadline() -> None:
    view = fr.view_round(record())
    assert not fr.should_close(view, 1_060.0 + fr.CLOSE_GRACE_S - 1)
    assert fr.should_close(view, 1_060.0 + fr.CLOSE_GRACE_S + 1)


# -- one round against the real aggregator app, in process ---------------------------------------


@pytest.fixture
async def aggregator_url(tmp_path: Path) -> AsyncIterator[str]:
    server = TestServer(create_app(AggregatorConfig(tmp_path, ADMIN), CollectorRegistry()), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_follow_selects_opens_and_completes_a_round(aggregator_url: str) -> None:
    ctx = context(spec(strategy="fedavg", localSteps={"min": 1, "max": 3}))
    uid = str(ctx.body.metadata.uid)
    rid = fr.round_id(ctx.name, uid)
    async with httpx.AsyncClient(
        base_url=aggregator_url, headers={"Authorization": f"Bearer {ADMIN}"}
    ) as admin:
        assert (await admin.put("/v1/model", content=encode_arrays(MODEL))).status_code == 200
        tokens = {}
        for cid, pop in (("a", "digits"), ("b", "digits"), ("c", "digits"), ("x", "other")):
            resp = await admin.post("/v1/clients", json={"client_id": cid, "labels": {"pop": pop}})
            tokens[cid] = resp.json()["token"]
        async with AggregatorClient(aggregator_url, ADMIN) as agg:
            await fr.follow(ctx, agg, uid)
            assert ctx.status.phase == RoundPhase.TRAINING
            assert ctx.status.selected_clients == ["a", "b", "c"]
            assert [a.local_steps for a in ctx.status.assignments] == [3, 3, 3]
            assert ctx.events[0][1] == "RoundOpened"

            def deliver(cid: str, value: float) -> int:
                with FederatedClient(aggregator_url, tokens[cid]) as client:
                    task = client.fetch_task()
                    assert task is not None and task.local_steps == 3
                    delta = {"w": np.full((2, 3), value, np.float32)}
                    return client.upload(task, delta, 1.0).status_code

            assert await asyncio.to_thread(deliver, "a", 1.0) == 202
            await fr.follow(ctx, agg, uid)  # the same round is followed, not opened again
            assert ctx.status.received_updates == 1
            # An operator that lost the status after opening the round adopts it from the aggregator.
            fresh = context(ctx.spec)
            await fr.follow(fresh, agg, uid)
            assert fresh.status.round_id == rid and fresh.status.phase == RoundPhase.TRAINING
            assert [(a.client, a.local_steps) for a in fresh.status.assignments] == [
                ("a", 3),
                ("b", 3),
                ("c", 3),
            ]
            assert not any(e[1] == "RoundOpened" for e in fresh.events)
            assert [await asyncio.to_thread(deliver, c, 2.0) for c in "bc"] == [202, 202]
            for _ in range(50):
                await fr.follow(ctx, agg, uid)
                if ctx.status.phase == RoundPhase.COMPLETED:
                    break
                await asyncio.sleep(0.05)
    assert ctx.status.phase == RoundPhase.COMPLETED
    assert ctx.status.result_metrics is not None and ctx.status.result_metrics.model_version == 1
    assert ctx.status.result_metrics.updates == 3
    assert ctx.status.condition("Ready").reason == "RoundCompleted"


async def test_unreachable_aggregator_is_an_error_to_retry() -> None:
    async with AggregatorClient("http://127.0.0.1:9", ADMIN, timeout_s=1) as agg:
        with pytest.raises(AggregatorUnavailable):
            await agg.status()


async def test_pinned_model_reference_never_serves_another_version(aggregator_url: str) -> None:
    async with httpx.AsyncClient(
        base_url=aggregator_url, headers={"Authorization": f"Bearer {ADMIN}"}
    ) as admin:
        assert (await admin.put("/v1/model", content=encode_arrays(MODEL))).status_code == 200
        assert (await admin.get("/v1/model", params={"version": "0"})).status_code == 200
        stale = await admin.get("/v1/model", params={"version": "3"})
        assert stale.status_code == 404 and "not the current one" in stale.json()["error"]


def test_client_cli_registers_labels_and_speed() -> None:
    base = ["federated", "client", "--url=http://a", "--client-id=c", "--shard=0", "--shards=2"]
    args = build_parser().parse_args(
        [*base, "--label=pop=digits", "--label=zone=eu", "--seconds-per-step=0.5"]
    )
    assert args.label == ["pop=digits", "zone=eu"] and args.seconds_per_step == 0.5
    assert fed_cli._labels(args.label) == {"pop": "digits", "zone": "eu"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        fed_cli._labels(["nolabel"])


async def test_ended_round_does_nothing_once_nobody_can_deliver() -> None:
    ctx = context(spec())
    ctx.status.phase = RoundPhase.COMPLETED
    kube = ctx.kube = FakeKube()
    await fr.reconcile(ctx)
    assert kube.calls == []  # no Kubernetes call at all
    assert ctx.status.phase == RoundPhase.COMPLETED


# -- secrets and TLS -------------------------------------------------------------------------------


def decoded(secret: dict[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


async def test_secrets_give_the_aggregator_its_certificate_and_clients_only_enrolment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AMPACITY_TOKEN_KEY", "operator-key")
    ca = tls.new_ca("operator CA")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    (tmp_path / "ca.key").write_bytes(ca.key_pem)
    monkeypatch.setenv(fr.CA_CERT_FILE_ENV, str(tmp_path / "ca.crt"))
    monkeypatch.setenv(fr.CA_KEY_FILE_ENV, str(tmp_path / "ca.key"))
    ctx = context(spec())
    kube = FakeKube()
    ctx.kube = kube
    assert await fr.ensure_secrets(ctx, ctx.spec, available=False) == fr.admin_token(ctx)
    created = {o["metadata"]["name"]: o for o in kube.of_kind("Secret")}
    assert sorted(created) == ["r1-aggregator-admin", "r1-aggregator-enrolment", "r1-aggregator-tls"]
    enrolment = decoded(created["r1-aggregator-enrolment"])
    assert enrolment == {"token": fr.enrolment_token(ctx).encode(), "ca.crt": ca.cert_pem}
    assert fr.enrolment_token(ctx) != fr.admin_token(ctx)
    issued = decoded(created["r1-aggregator-tls"])
    assert created["r1-aggregator-tls"]["type"] == "kubernetes.io/tls"
    cert = x509.load_pem_x509_certificate(issued["tls.crt"])
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "r1-aggregator.ns.svc" in names.get_values_for_type(x509.DNSName)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))
    # The next reconcile of this operator sends nothing (not three 409s and a new key per poll).
    await fr.ensure_secrets(ctx, ctx.spec, available=False)
    assert kube.count("create", "Secret") == 3
    # An operator restarted (a fresh memo) finds them there (409) and neither reads nor replaces them.
    ctx.memo.clear()
    await fr.ensure_secrets(ctx, ctx.spec, available=True)
    assert decoded(kube.stored("Secret", "ns", "r1-aggregator-tls") or {}) == issued
    assert kube.count("create", "Secret") == 6 and kube.count("get", "Secret") == 0
    assert kube.count("list", "Secret") == 0 and kube.count("apply", "Secret") == 0
    # While the aggregator is not available, a Secret deleted by hand is written again, not at once
    # but within SECRETS_RECHECK_SECONDS (the aggregator cannot start without it).
    await kube.delete("Secret", "ns", "r1-aggregator-admin")
    await fr.ensure_secrets(ctx, ctx.spec, available=False)
    assert kube.stored("Secret", "ns", "r1-aggregator-admin") is None
    uid, at = ctx.memo[fr.SECRETS_MEMO]
    ctx.memo[fr.SECRETS_MEMO] = (uid, at - fr.SECRETS_RECHECK_SECONDS)
    await fr.ensure_secrets(ctx, ctx.spec, available=True)
    assert kube.stored("Secret", "ns", "r1-aggregator-admin") is None  # available: nothing is missing
    await fr.ensure_secrets(ctx, ctx.spec, available=False)
    assert kube.stored("Secret", "ns", "r1-aggregator-admin") is not None


async def test_without_a_ca_the_round_waits_instead_of_serving_plain_http(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(fr.CA_CERT_FILE_ENV, raising=False)
    monkeypatch.delenv(fr.CA_KEY_FILE_ENV, raising=False)
    ctx = context(spec())
    ctx.kube = None  # type: ignore[assignment]  # nothing may be created without TLS
    await fr.reconcile(ctx)
    ready = ctx.status.condition("Ready")
    assert ready.reason == "TLSUnavailable" and "insecureHTTP" in ready.message
    # Asked for explicitly, plain HTTP needs no CA and no TLS Secret.
    monkeypatch.setenv("AMPACITY_TOKEN_KEY", "operator-key")
    plain = context(spec(aggregator={"insecureHTTP": True}))
    kube = FakeKube()
    plain.kube = kube
    await fr.ensure_secrets(plain, plain.spec, available=False)
    assert [o["metadata"]["name"] for o in kube.of_kind("Secret")] == [
        "r1-aggregator-admin",
        "r1-aggregator-enrolment",
    ]
    assert "ca.crt" not in (kube.stored("Secret", "ns", "r1-aggregator-enrolment") or {})["data"]
    assert fr.service_url("r1", "ns", True) == "http://r1-aggregator.ns.svc:8443"


async def test_a_run_carries_the_model_from_round_to_round_and_records_each(aggregator_url: str) -> None:
    ctx = context(
        spec(rounds=3, cohortSize=2, minQuorum=2, strategy="fedavg", localSteps={"min": 1, "max": 1})
    )
    uid = str(ctx.body.metadata.uid)
    async with httpx.AsyncClient(
        base_url=aggregator_url, headers={"Authorization": f"Bearer {ADMIN}"}
    ) as admin:
        assert (await admin.put("/v1/model", content=encode_arrays(MODEL))).status_code == 200
        tokens = {}
        for cid in ("a", "b"):
            resp = await admin.post("/v1/clients", json={"client_id": cid, "labels": {"pop": "digits"}})
            tokens[cid] = resp.json()["token"]

        def deliver(cid: str, accuracy: float) -> int:
            with FederatedClient(aggregator_url, tokens[cid]) as client:
                task = client.fetch_task()
                assert task is not None
                version, _ = client.fetch_model()
                task = task.model_copy(update={"model_version": version})
                return client.upload(
                    task, {"w": np.ones((2, 3), np.float32)}, 1.0, accuracy=accuracy
                ).status_code

        async with AggregatorClient(aggregator_url, ADMIN) as agg:
            for index in (1, 2, 3):
                await fr.follow(ctx, agg, uid)  # opens round `index`
                assert ctx.status.current_round == index and ctx.status.phase == RoundPhase.TRAINING
                assert ctx.status.round_id == fr.round_id(ctx.name, uid, index)
                assert [await asyncio.to_thread(deliver, c, 0.5 + 0.1 * index) for c in "ab"] == [202, 202]
                for _ in range(50):
                    await fr.follow(ctx, agg, uid)
                    if ctx.status.completed_rounds == index:
                        break
                    await asyncio.sleep(0.05)
                assert ctx.status.completed_rounds == index
            model = await admin.get("/v1/model")
    # Each round started from the previous one's model: three unit deltas on a zero model.
    assert model.headers["X-Ampacity-Model-Version"] == "3"
    assert np.allclose(decode_arrays(model.content)[0]["w"], 3.0)
    assert ctx.status.phase == RoundPhase.COMPLETED and ctx.status.current_round == 3
    assert [(h.round, h.model_version, h.participants, h.stragglers) for h in ctx.status.history] == [
        (1, 1, 2, []),
        (2, 2, 2, []),
        (3, 3, 2, []),
    ]
    assert [h.accuracy for h in ctx.status.history] == pytest.approx([0.6, 0.7, 0.8])
    assert ctx.status.condition("Ready").reason == "RoundCompleted"


async def test_an_ended_run_removes_its_aggregator_only_when_a_claim_keeps_the_model() -> None:
    done = FederatedRoundStatus(
        phase=RoundPhase.COMPLETED,
        round_id="r1-1",
        selected_clients=["a"],
        received_updates=1,
        completion_time=datetime(2026, 1, 1, tzinfo=UTC),
        result_metrics=fr.RoundResult(model_version=5),
    )
    kube = FakeKube()
    for kind in ("Deployment", "Service"):
        kube.add({"kind": kind, "metadata": {"name": "r1-aggregator", "namespace": "ns"}})
    on_empty_dir = context(spec())
    on_empty_dir.status = done.model_copy(deep=True)
    on_empty_dir.kube = kube
    await fr.reconcile(on_empty_dir)
    assert kube.count("delete") == 0 and not on_empty_dir.status.aggregator_removed

    on_claim = context(spec(aggregator={"stateVolumeClaim": "fl-state"}))
    on_claim.status = done.model_copy(deep=True)
    on_claim.kube = kube
    await fr.reconcile(on_claim)
    assert kube.stored("Deployment", "ns", "r1-aggregator") is None
    assert kube.stored("Service", "ns", "r1-aggregator") is None
    assert (
        on_claim.status.aggregator_removed and on_claim.status.result == "file:///state/models/global-v5.npz"
    )
    assert on_claim.events[-1][1] == "AggregatorRemoved"
    await fr.reconcile(on_claim)  # level-based: nothing more to do
    assert kube.count("delete") == 2


def test_an_unreachable_aggregator_is_polled_less_and_less_often() -> None:
    assert fr.poll_seconds(0) == fr.POLL_INTERVAL_S
    assert fr.poll_seconds(1) == 2 * fr.POLL_INTERVAL_S
    assert fr.poll_seconds(50) == fr.UNREACHABLE_POLL_MAX_S
