"""The activator's Kubernetes side: the pool's pods by component, and the status it writes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ampacity.activation import PodDirectory, report_patch, wake_patch
from ampacity.api.servingpool import ServingPoolStatus
from tests.fakes import FakeKube


def _pod(name: str, component: str, ip: str, ready: bool = True, deleting: bool = False) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {"app.kubernetes.io/component": component, "ampacity.dev/servingpool": "chat"},
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "kind": "Pod",
        "metadata": metadata,
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_only_ready_pods_that_stay_are_engines_and_routers_to_use() -> None:
    directory = PodDirectory(FakeKube(), "ns", "chat", {"prefill": 8000, "decode": 8000, "router": 9000})
    directory.seen(
        [
            _pod("p0", "prefill", "10.0.0.1"),
            _pod("p1", "prefill", "10.0.0.2", ready=False),
            _pod("d0", "decode", "10.0.0.3", deleting=True),
            _pod("r0", "router", "10.0.0.4"),
            _pod("r1", "router", "10.0.0.5"),
        ]
    )
    assert directory.urls("prefill") == ["http://10.0.0.1:8000"]
    assert directory.urls("decode") == []
    assert {directory.router(), directory.router()} == {"http://10.0.0.4:9000", "http://10.0.0.5:9000"}
    directory.event({"type": "ADDED", "object": _pod("d1", "decode", "10.0.0.6")})
    directory.event({"type": "DELETED", "object": _pod("p0", "prefill", "10.0.0.1")})
    assert directory.urls("decode") == ["http://10.0.0.6:8000"] and directory.urls("prefill") == []


def test_what_the_activator_writes_is_its_own_status_field_as_the_api_reads_it() -> None:
    asked = wake_patch(datetime(2026, 1, 1, 1, tzinfo=UTC), held=3, wakes=2)
    done = report_patch(longest_wait=12.3456, waited_total=40.0)
    status = ServingPoolStatus.model_validate({"activation": asked["activation"] | done["activation"]})
    assert status.activation is not None
    assert status.activation.wake_requested_at == datetime(2026, 1, 1, 1, tzinfo=UTC)
    assert (status.activation.wakes, status.activation.held_requests) == (2, 0)
    assert (status.activation.last_wait_seconds, status.activation.waited_seconds) == (12.346, 40.0)
    assert set(asked) == set(done) == {"activation"}
