"""gs:// checkpoints through the same fsspec path as s3://, against a real GCS emulator.

fake-gcs-server (built with the control plane) speaks Google Cloud Storage's JSON API;
gcsfs reaches it through the endpoint the operator writes as AMPACITY_CHECKPOINT_ENDPOINT,
exactly as s3fs reaches an S3-compatible store. `NO_GCE_CHECK` stands in for a pod's
GOOGLE_APPLICATION_CREDENTIALS: without credentials gcsfs would probe the GCE metadata
server, which this machine does not have.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from ampacity.dev.cluster.binaries import ensure_binaries
from ampacity.training.retention import RetentionPolicy
from ampacity.training.sdk.storage import CheckpointStore
from ampacity.training.sdk.torch_checkpoint import Checkpointer

BUCKET = "checkpoints"
URI = f"gs://{BUCKET}/job"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = Path(ensure_binaries()["fake-gcs-server"])
    assert server.exists(), f"{server} is missing: tools/controlplane/build.sh builds it"
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log").open("w")
    argv = [str(server), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory"]
    process = subprocess.Popen(
        [*argv, "-public-host", f"127.0.0.1:{port}", "-log-level", "warn"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{endpoint}/storage/v1/b", timeout=2).raise_for_status()
                break
            except httpx.TransportError:
                assert process.poll() is None, f"fake-gcs-server exited; see {log.name}"
                assert time.monotonic() < deadline, f"fake-gcs-server did not answer; see {log.name}"
                time.sleep(0.2)
        created = httpx.post(f"{endpoint}/storage/v1/b", params={"project": "test"}, json={"name": BUCKET})
        created.raise_for_status()
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def stored_objects(endpoint: str) -> list[str]:
    listing = httpx.get(f"{endpoint}/storage/v1/b/{BUCKET}/o").raise_for_status().json()
    return sorted(item["name"] for item in listing.get("items", []))


def test_gs_checkpoints_commit_retain_and_resume_through_the_job_environment(
    gcs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMPACITY_CHECKPOINT_URI", URI)
    monkeypatch.setenv("AMPACITY_CHECKPOINT_ENDPOINT", gcs)
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    state = {"w": torch.arange(8.0), "nested": {"exp_avg": torch.ones(3)}}
    with Checkpointer(attempt=0, retention=RetentionPolicy(keep_last=1)) as ckpt:
        for step in (1, 2, 3):
            state["w"] += 1
            ckpt.save(step, state, extra={"data_position": step * 10})
        result = ckpt.wait()
    assert result is not None and result.committed and result.step == 3

    # What the store holds is the emulator's, seen through its own API: DCP's files and the
    # manifest of step 3 only (retention deleted 1 and 2).
    names = stored_objects(gcs)
    assert names, "nothing reached the GCS emulator"
    assert {name.split("/")[1] for name in names} == {"step-000000000003"}
    assert "job/step-000000000003/manifest.json" in names
    assert "job/step-000000000003/.metadata" in names

    store = CheckpointStore(URI, {"endpoint_url": gcs})
    assert [(c.step, c.committed) for c in store.checkpoints()] == [(3, True)]
    assert store.read_manifest(3).extra == {"data_position": 30}

    loaded = {"w": torch.zeros(8), "nested": {"exp_avg": torch.zeros(3)}}
    with Checkpointer() as ckpt:
        restored = ckpt.load_latest(loaded)
    assert restored is not None and restored.step == 3
    assert torch.equal(loaded["w"], torch.arange(8.0) + 3)
    assert torch.equal(loaded["nested"]["exp_avg"], torch.ones(3))
