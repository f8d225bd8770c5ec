"""Node fault trace of a production LLM training cluster, as a failure-rate prior.

The trace is stepfun-ai/InfiniteHBD-Trace (Apache-2.0): `fault_start` / `fault_end`
events of the nodes of a 400-server training cluster, `event_time` in days from the start
of the observation (the published file covers days 0-200). The span is read from the
events (`observed_span_days`), so a longer or shorter trace is neither cut nor padded.
Only nodes that failed at least once appear in it (169 of them), so the cluster
size is a parameter (400 per the source) and the missing nodes are fault-free.

A training job is gang-scheduled: a fault on any of its nodes stops the whole job, so
a job of N nodes sees the union of its nodes' faults, and under the usual independent
exponential model its MTBF is 1 / (N * per-node rate).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ampacity.data import trace_path

#: Servers in the cluster the InfiniteHBD trace was recorded on (per its README).
INFINITEHBD_CLUSTER_NODES = 400
HOURS_PER_DAY = 24.0


def infinitehbd_path() -> Path:
    """Where the InfiniteHBD fault trace sits in the shared data folder."""
    return trace_path("infinitehbd", "fault_trace_days_0_200.json")


@dataclass(frozen=True)
class Fault:
    """One node fault: when it started and ended (days; `end_days` None if still open)."""

    node_id: str
    start_days: float
    end_days: float | None
    level: str
    fault_class: str
    description: str


@dataclass(frozen=True)
class FailureTrace:
    """Faults of a cluster of `cluster_nodes` nodes observed over `span_days`."""

    faults: tuple[Fault, ...]
    cluster_nodes: int
    span_days: tuple[float, float]

    @property
    def span_hours(self) -> float:
        return (self.span_days[1] - self.span_days[0]) * HOURS_PER_DAY

    def node_ids(self) -> list[str]:
        """All node ids of the cluster: those in the trace, then fault-free placeholders."""
        seen = sorted({f.node_id for f in self.faults})
        return seen + [f"fault-free-{i}" for i in range(self.cluster_nodes - len(seen))]

    def window(self, start_days: float, end_days: float) -> FailureTrace:
        """The faults that start in [start_days, end_days), on the same cluster."""
        kept = tuple(f for f in self.faults if start_days <= f.start_days < end_days)
        return FailureTrace(kept, self.cluster_nodes, (start_days, end_days))

    def node_failure_rate_per_hour(self) -> float:
        """Faults per node-hour over the whole cluster (the exponential-model MLE)."""
        return len(self.faults) / (self.cluster_nodes * self.span_hours)

    def job_mtbf_hours(self, nodes: int) -> float:
        """Mean time between interruptions of a gang of `nodes` nodes."""
        if nodes <= 0:
            raise ValueError("a job needs at least one node")
        return 1.0 / (nodes * self.node_failure_rate_per_hour())

    def sample_job_nodes(self, nodes: int, rng: np.random.Generator) -> list[str]:
        """A random placement of a job on `nodes` distinct nodes of the cluster."""
        if not 0 < nodes <= self.cluster_nodes:
            raise ValueError(f"a job must fit the cluster: 1..{self.cluster_nodes} nodes, got {nodes}")
        ids = self.node_ids()
        return [ids[i] for i in sorted(rng.choice(len(ids), size=nodes, replace=False))]

    def job_failure_hours(self, node_ids: Sequence[str]) -> np.ndarray:
        """Sorted start times (hours from the window start) of faults on any of `node_ids`."""
        wanted = set(node_ids)
        times = [
            (f.start_days - self.span_days[0]) * HOURS_PER_DAY for f in self.faults if f.node_id in wanted
        ]
        return np.sort(np.asarray(times, dtype=np.float64))


def observed_span_days(event_times: Sequence[float]) -> tuple[float, float]:
    """The observation window of a trace: from its origin (day 0, or the first event if earlier)
    to the end of the day of its last event (a fault or a repair)."""
    if not event_times:
        raise ValueError("a trace without events has no span")
    return (min(0.0, math.floor(min(event_times))), float(math.ceil(max(event_times))))


def load_failure_trace(
    path: Path | None = None,
    *,
    cluster_nodes: int = INFINITEHBD_CLUSTER_NODES,
    span_days: tuple[float, float] | None = None,
) -> FailureTrace:
    """Read the InfiniteHBD fault trace, pairing each `fault_start` with its `fault_end`.

    Starts and ends are paired first-in first-out per (node, description). Every fault
    counts, hardware or not: any of them takes a node out of a running gang. The span is
    the trace's own (`observed_span_days`) unless given.
    """
    events: list[dict[str, Any]] = json.loads((path or infinitehbd_path()).read_text())
    span = span_days or observed_span_days([float(e["event_time"]) for e in events])
    events.sort(key=lambda e: float(e["event_time"]))
    pending: dict[tuple[str, str], deque[int]] = defaultdict(deque)
    starts: list[dict[str, Any]] = []
    ends: dict[int, float] = {}
    for event in events:
        key = (str(event["node_id"]), str(event["fault_type"]["Desc"]))
        if event["event_type"] == "fault_start":
            pending[key].append(len(starts))
            starts.append(event)
        elif event["event_type"] == "fault_end" and pending[key]:
            ends[pending[key].popleft()] = float(event["event_time"])
    faults = tuple(
        Fault(
            node_id=str(event["node_id"]),
            start_days=float(event["event_time"]),
            end_days=ends.get(i),
            level=str(event["fault_type"]["Level"]),
            fault_class=str(event["fault_type"]["Class"]),
            description=str(event["fault_type"]["Desc"]),
        )
        for i, event in enumerate(starts)
    )
    if len({f.node_id for f in faults}) > cluster_nodes:
        raise ValueError(f"the trace names more than {cluster_nodes} nodes")
    return FailureTrace(faults, cluster_nodes, span)
