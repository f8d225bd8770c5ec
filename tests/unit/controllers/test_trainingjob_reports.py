"""The trainer report endpoint: what a report does to the status, and who may send one."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ampacity.api.trainingjob import CheckpointCost, TrainingJobSpec, TrainingJobStatus
from ampacity.kube import KubeError
from ampacity.training.retention import RetentionPolicy
from ampacity.training.sdk.layout import retention_from_env
from ampacity.training.sdk.report import CheckpointReport, Reporter, TrainerReport
from controllers import tokens
from controllers.trainingjob import reports
from tests.fakes import merge_patch

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def spec(interval: dict[str, Any] | None = None) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate(
        {
            "workers": {"replicas": 2},
            "template": {},
            "checkpoint": {"storage": {"uri": "s3://b"}, "interval": interval or {"policy": "auto"}},
        }
    )


def report(
    step: int,
    *,
    ckpt: int | None = None,
    committed: bool = True,
    stall: float = 1.0,
    persist: float = 10.0,
    attempt: int | None = 0,
    step_seconds: float | None = None,
) -> TrainerReport:
    checkpoint = None
    if ckpt is not None:
        checkpoint = CheckpointReport(
            step=ckpt,
            location=f"/c/step-{ckpt:012d}",
            size_bytes=100,
            stall_seconds=stall,
            persist_seconds=persist,
            committed=committed,
            finished_at=NOW,
        )
    return TrainerReport(
        namespace="ns",
        job="llm",
        rank=0,
        world_size=2,
        step=step,
        sent_at=NOW,
        step_seconds=step_seconds,
        checkpoint=checkpoint,
        attempt=attempt,
    )


def test_only_committed_checkpoints_become_the_latest() -> None:
    status = TrainingJobStatus()
    reports.apply_report(spec(), status, report(10, ckpt=10), NOW)
    assert status.latest_checkpoint is not None and status.latest_checkpoint.step == 10
    reports.apply_report(spec(), status, report(20, ckpt=20, committed=False), NOW)
    assert status.latest_checkpoint.step == 10
    assert status.current_step == 20
    # An older committed one (a slow rank's report) does not move the latest back.
    reports.apply_report(spec(), status, report(20, ckpt=5), NOW)
    assert status.latest_checkpoint.step == 10


def test_late_report_of_a_stopped_gang_moves_nothing_but_a_committed_checkpoint() -> None:
    status = TrainingJobStatus(gang=2, current_step=50)
    reports.apply_report(spec(), status, report(90, ckpt=80, attempt=1, step_seconds=9.0), NOW)
    assert status.current_step == 50  # the running gang's progress
    assert status.step_seconds is None and status.last_report_time is None
    assert status.checkpoint_cost is None
    assert status.latest_checkpoint is not None and status.latest_checkpoint.step == 80


def test_save_cost_is_the_slowest_rank_of_the_newest_step() -> None:
    status = TrainingJobStatus()
    reports.apply_report(spec(), status, report(10, ckpt=10, stall=1.0, persist=5.0), NOW)
    reports.apply_report(spec(), status, report(10, ckpt=10, stall=0.5, persist=8.0), NOW)
    assert status.checkpoint_cost == CheckpointCost(step=10, stall_seconds=1.0, persist_seconds=8.0)
    reports.apply_report(spec(), status, report(20, ckpt=20, stall=0.2, persist=3.0), NOW)
    assert status.checkpoint_cost == CheckpointCost(step=20, stall_seconds=0.2, persist_seconds=3.0)


def test_auto_interval_follows_measurements_and_failures() -> None:
    status = TrainingJobStatus(nodes=4)
    first = reports.decide_interval(spec(), status, NOW)
    assert first.interval_seconds == reports.FIRST_INTERVAL_SECONDS
    quick = reports.apply_report(spec(), status, report(10, ckpt=10, stall=2.0, persist=5.0), NOW)
    assert "Daly" in quick.reason and "prior" in quick.reason
    assert status.checkpoint_interval == round(quick.interval_seconds)
    slow = reports.apply_report(spec(), status, report(20, ckpt=20, stall=2.0, persist=40_000.0), NOW)
    assert slow.interval_seconds == 40_000.0 and "persist time" in slow.reason
    # Failures the job saw raise its failure rate: a shorter interval for the same cost.
    calm = reports.decide_interval(spec(), status.model_copy(update={"checkpoint_cost": None}), NOW)
    base = status.model_copy(
        update={"checkpoint_cost": CheckpointCost(step=1, stall_seconds=2, persist_seconds=1)}
    )
    flaky = base.model_copy(update={"restarts": 20, "gang_start_time": NOW - timedelta(hours=1)})
    assert (
        reports.decide_interval(spec(), flaky, NOW).interval_seconds
        < reports.decide_interval(spec(), base, NOW).interval_seconds
    )
    assert calm.interval_seconds == reports.FIRST_INTERVAL_SECONDS


def test_fixed_interval_is_as_declared() -> None:
    decision = reports.decide_interval(spec({"policy": "fixed", "every": "30m"}), TrainingJobStatus(), NOW)
    assert decision.interval_seconds == 1800.0
    assert decision.reason.startswith("fixed")


# That a reconcile which read an older status never undoes what reports wrote (one writer per
# status field) is tested against the fake API server, in test_reconcile_trainingjob.py.


class FakeKube:
    """Just enough of `Kube` for the endpoint: a TrainingJob and its status patches (no Secrets)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {
            ("TrainingJob", "llm"): {
                "metadata": {"uid": "uid-endpoint"},
                "spec": spec().to_api(),
                "status": {"gang": 0},
            },
        }
        self.patches: list[dict[str, Any]] = []

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        assert kind != "Secret", "the operator never reads Secrets"
        return self.objects.get((kind, name))

    async def patch_status(
        self, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        if status.get("currentStep") == 666:
            raise KubeError(409, "conflict")
        self.patches.append(status)
        obj = self.objects[(kind, name)]
        obj["status"] = merge_patch(obj["status"], status)  # as the API server keeps it
        return obj


@pytest.fixture
def token_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tokens.KEY_ENV, "operator-key")


async def test_endpoint_authenticates_records_and_acknowledges(
    token_key: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reports, "PATCH_MIN_SECONDS", 1.0)
    kube = FakeKube()
    secret = reports.report_token("uid-endpoint")
    path = reports.report_path("ns", "llm")
    async with TestClient(TestServer(reports.make_app(kube))) as client:  # type: ignore[arg-type]
        body = report(7, ckpt=7).model_dump_json()
        json_headers = {"Content-Type": "application/json"}
        missing = await client.post(path, data=body, headers=json_headers)
        assert missing.status == 401
        wrong = await client.post(path, data=body, headers={**json_headers, "Authorization": "Bearer nope"})
        assert wrong.status == 401
        assert kube.patches == []
        auth = {**json_headers, "Authorization": f"Bearer {secret}"}
        ok = await client.post(path, data=body, headers=auth)
        assert ok.status == 200
        ack = await ok.json()
        assert ack["checkpoint_interval_seconds"] > 0 and "auto" in ack["reason"]
        assert kube.patches[-1]["latestCheckpoint"]["step"] == 7
        assert set(kube.patches[-1]) == {
            "currentStep",
            "latestCheckpoint",
            "lastReportTime",
            "stepSeconds",
            "checkpointCost",
            "checkpointInterval",
            "checkpointIntervalReason",
        }
        # Another job (unknown here) answers exactly like a wrong token.
        other = await client.post(reports.report_path("ns", "other"), data=body, headers=auth)
        assert other.status == 401
        mismatch = await client.post(path, data=body.replace('"llm"', '"other"'), headers=auth)
        assert mismatch.status == 400
        garbage = await client.post(path, data="{}", headers=auth)
        assert garbage.status == 400
        # Progress alone, right after a write: held back, still acknowledged ...
        patches = len(kube.patches)
        quiet = await client.post(path, data=report(8).model_dump_json(), headers=auth)
        assert quiet.status == 200 and len(kube.patches) == patches
        # ... and written once the time is up, with nothing else arriving meanwhile.
        for _ in range(100):
            if len(kube.patches) > patches:
                break
            await asyncio.sleep(0.05)
        assert kube.patches[-1]["currentStep"] == 8 and len(kube.patches) == patches + 1
        refused = await client.post(path, data=report(666, ckpt=666).model_dump_json(), headers=auth)
        assert refused.status == 502


def test_a_job_token_is_good_from_the_start_and_only_for_that_job(token_key: None) -> None:
    """The token is derived from the operator key and the job's uid: good before any status is
    written, and a job recreated under the same name does not inherit the old job's token."""
    obj: dict[str, Any] = {"metadata": {"uid": "u-2"}, "status": {}}
    fresh = reports.report_token("u-2")
    assert reports.token_matches(obj, fresh)
    assert not reports.token_matches(obj, "stale")
    assert not reports.token_matches({"metadata": {"uid": "u-3"}}, fresh)
    assert not reports.token_matches(obj, "")
    assert not reports.token_matches({"metadata": {}}, fresh)
    # One scheme for every kind: a FederatedRound's admin token of the same uid is another token.
    assert fresh != tokens.derive_token(tokens.AGGREGATOR_ADMIN, "u-2")


@pytest.mark.parametrize("base", [None, "http://op:1/"])
def test_report_url(base: str | None) -> None:
    url = reports.report_url("ns", "llm", base)
    assert url.endswith("/v1/namespaces/ns/trainingjobs/llm/reports")
    assert "//v1" not in url


def test_sdk_reads_what_the_controller_puts_in_the_worker_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    for name, value in {
        "AMPACITY_REPORT_URL": "http://op/v1/namespaces/ns/trainingjobs/llm/reports",
        "AMPACITY_REPORT_TOKEN_FILE": str(token),
        "AMPACITY_JOB_NAMESPACE": "ns",
        "AMPACITY_JOB_NAME": "llm",
        "AMPACITY_ATTEMPT": "3",
        "RANK": "1",
        "WORLD_SIZE": "2",
        "AMPACITY_RETENTION_KEEP_LAST": "2",
        "AMPACITY_RETENTION_KEEP_EVERY": "100",
    }.items():
        monkeypatch.setenv(name, value)
    reporter = Reporter.from_env()
    assert reporter is not None
    with reporter:
        built = reporter.build(5)
    assert (built.attempt, built.rank, built.world_size, built.job) == (3, 1, 2, "llm")
    assert retention_from_env() == RetentionPolicy(keep_last=2, keep_every=100)
    monkeypatch.delenv("AMPACITY_RETENTION_KEEP_LAST")
    assert retention_from_env() is None
