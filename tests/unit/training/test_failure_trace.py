import json
from pathlib import Path

import numpy as np
import pytest

from ampacity.training.checkpoint_interval import FailureRatePrior
from ampacity.training.failure_trace import load_failure_trace, observed_span_days


def test_real_trace_counts_and_rates() -> None:
    trace = load_failure_trace()
    assert len(trace.faults) == 333
    assert len({f.node_id for f in trace.faults}) == 169
    assert len(trace.node_ids()) == 400
    rate = trace.node_failure_rate_per_hour()
    assert rate == pytest.approx(333 / (400 * 4800))
    assert trace.job_mtbf_hours(100) == pytest.approx(2 * trace.job_mtbf_hours(200))
    assert all(f.end_days is None or f.end_days >= f.start_days for f in trace.faults)


def test_windows_split_the_faults() -> None:
    trace = load_failure_trace()
    early, late = trace.window(0, 100), trace.window(100, 200)
    assert len(early.faults) + len(late.faults) == len(trace.faults)
    assert late.span_hours == 2400


def test_job_placement_is_seeded_and_failures_sorted() -> None:
    trace = load_failure_trace()
    a = trace.sample_job_nodes(64, np.random.default_rng(7))
    b = trace.sample_job_nodes(64, np.random.default_rng(7))
    assert a == b and len(set(a)) == 64
    hours = trace.job_failure_hours(a)
    assert np.all(np.diff(hours) >= 0)
    assert len(trace.job_failure_hours(trace.node_ids())) == 333
    with pytest.raises(ValueError):
        trace.sample_job_nodes(401, np.random.default_rng(0))


def test_starts_pair_with_ends_per_node_and_description(tmp_path: Path) -> None:
    def event(node: str, t: float, kind: str, desc: str) -> dict[str, object]:
        return {
            "node_id": node,
            "event_time": t,
            "event_type": kind,
            "fault_type": {"Level": "Hardware Failure", "Class": "GPU", "Desc": desc},
        }

    path = tmp_path / "trace.json"
    path.write_text(
        json.dumps(
            [
                event("n1", 1.0, "fault_start", "xid"),
                event("n2", 1.5, "fault_start", "xid"),
                event("n1", 2.0, "fault_end", "xid"),
                event("n1", 3.0, "fault_start", "ecc"),
            ]
        )
    )
    trace = load_failure_trace(path, cluster_nodes=4, span_days=(0.0, 10.0))
    assert [(f.node_id, f.end_days) for f in trace.faults] == [("n1", 2.0), ("n2", None), ("n1", None)]
    assert trace.node_failure_rate_per_hour() == pytest.approx(3 / (4 * 240))
    assert list(trace.job_failure_hours(["n1"])) == [24.0, 72.0]


def test_the_span_is_read_from_the_trace_so_a_longer_one_is_not_cut(tmp_path: Path) -> None:
    def fault(node: str, t: float, kind: str = "fault_start") -> dict[str, object]:
        return {
            "node_id": node,
            "event_time": t,
            "event_type": kind,
            "fault_type": {"Level": "L", "Class": "C", "Desc": "d"},
        }

    assert load_failure_trace().span_days == (0.0, 200.0)  # the published file: days 0-200
    longer = tmp_path / "longer.json"
    longer.write_text(json.dumps([fault("n1", 3.2), fault("n1", 150.0, "fault_end"), fault("n2", 259.4)]))
    trace = load_failure_trace(longer, cluster_nodes=10)
    assert trace.span_days == (0.0, 260.0)
    assert trace.node_failure_rate_per_hour() == pytest.approx(2 / (10 * 260 * 24))
    assert observed_span_days([-1.5, 3.0]) == (-2.0, 3.0)
    with pytest.raises(ValueError, match="no span"):
        observed_span_days([])


def test_the_clusters_own_failures_move_the_prior() -> None:
    prior = FailureRatePrior(rate_per_node_hour=1e-3, weight=2.0, source="trace")
    assert prior.with_history(0, 0.0) is prior
    # A healthy cluster: no failure in 8000 node-hours lowers the rate (2 / (2000 + 8000)).
    healthy = prior.with_history(0, 8000.0)
    assert healthy.rate_per_node_hour == pytest.approx(2e-4) and healthy.weight == 2.0
    # A flaky one: 18 failures in 2000 node-hours raises it to (2 + 18) / (2000 + 2000).
    flaky = prior.with_history(18, 2000.0)
    assert flaky.rate_per_node_hour == pytest.approx(5e-3) and flaky.weight == 20.0
    assert "18 failures in 2000 node-h" in flaky.source
    with pytest.raises(ValueError):
        prior.with_history(-1, 10.0)
