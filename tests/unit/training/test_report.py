import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ampacity.training.sdk import Reporter, SaveResult, TrainerReport, TrainerReportAck


class Endpoint:
    """A real HTTP endpoint on 127.0.0.1 that accepts one bearer token, like the operator's."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.received: list[TrainerReport] = []
        self.rejected = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Authorization") != f"Bearer {endpoint.token}":
                    endpoint.rejected += 1
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                endpoint.received.append(TrainerReport.model_validate_json(body))
                answer = json.dumps({"checkpoint_interval_seconds": 1320.0, "reason": "auto: test"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, fmt: str, *args: object) -> None:  # quiet test output
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/report"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    server = Endpoint("s3cret")
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


RESULT = SaveResult(
    step=1200,
    path=Path("/ckpt/step-000000001200"),
    size_bytes=4096,
    stall_seconds=0.25,
    persist_seconds=3.5,
    committed=True,
    finished_at=1_700_000_000.0,
)


def test_report_reaches_the_endpoint_with_the_token(endpoint: Endpoint) -> None:
    reporter = Reporter(endpoint.url, namespace="ml", job="llama", token="s3cret", rank=1, world_size=4)
    with reporter:
        ack = reporter.report(1234, checkpoint=RESULT, step_seconds=0.8)
        progress = reporter.report(1235)
    assert ack == TrainerReportAck(checkpoint_interval_seconds=1320.0, reason="auto: test")
    assert progress is not None and reporter.failures == 0
    first, second = endpoint.received
    assert (first.namespace, first.job, first.rank, first.world_size) == ("ml", "llama", 1, 4)
    assert first.step == 1234
    assert first.step_seconds == 0.8
    assert first.checkpoint is not None
    assert first.checkpoint.model_dump() == {
        "step": 1200,
        "location": "/ckpt/step-000000001200",
        "size_bytes": 4096,
        "stall_seconds": 0.25,
        "persist_seconds": 3.5,
        "committed": True,
        "finished_at": datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
    }
    assert second.checkpoint is None and second.step == 1235


def test_wrong_token_is_rejected_and_counted(endpoint: Endpoint) -> None:
    with Reporter(endpoint.url, namespace="ml", job="llama", token="wrong") as reporter:
        assert reporter.report(1) is None
    assert reporter.failures == 1 and endpoint.rejected == 1 and endpoint.received == []


def test_token_file_is_reread_so_rotation_works(endpoint: Endpoint, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("old\n")
    with Reporter(endpoint.url, namespace="ml", job="llama", token_file=token_file) as reporter:
        assert reporter.report(1) is None
        token_file.write_text("s3cret\n")
        assert reporter.report(2) is not None
    assert [r.step for r in endpoint.received] == [2]


def test_unreachable_operator_does_not_stop_training() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    with Reporter(f"http://127.0.0.1:{port}/report", namespace="ml", job="j", token="t") as reporter:
        assert reporter.report(1) is None
    assert reporter.failures == 1


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AMPACITY_REPORT_URL", raising=False)
    assert Reporter.from_env() is None
    monkeypatch.setenv("AMPACITY_REPORT_URL", "http://127.0.0.1:1/report")
    monkeypatch.setenv("AMPACITY_REPORT_TOKEN", "t")
    monkeypatch.setenv("AMPACITY_JOB_NAMESPACE", "ml")
    monkeypatch.setenv("AMPACITY_JOB_NAME", "llama")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    reporter = Reporter.from_env()
    assert reporter is not None
    assert (reporter.namespace, reporter.job, reporter.rank, reporter.world_size) == ("ml", "llama", 3, 8)
    reporter.close()
    with pytest.raises(ValueError):
        Reporter("http://127.0.0.1:1/", namespace="ml", job="j")
