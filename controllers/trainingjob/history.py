"""The cluster's own failure history, as the operator has seen it: restarts and node-hours per job.

Each TrainingJob reconcile records its job's restarts and exposure here and reads back the
sum over the *other* jobs (its own are already the job's evidence in the auto interval);
the reconciler writes that sum into the job's status, where both writers of the interval
(the reconciler and the report endpoint) read it, so they decide with the same prior.
A deleted job's history stays (the cluster's failures did happen) until the operator restarts;
kept in kopf's memo for the whole operator and refilled by the jobs' passes after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ClusterFailureHistory:
    #: namespace/name -> (gang failures, node-hours run)
    jobs: dict[str, tuple[int, float]] = field(default_factory=dict)

    def record(self, key: str, failures: int, exposure_node_hours: float) -> tuple[int, float]:
        """Note one job's history; returns the failures and node-hours of all the others."""
        self.jobs[key] = (failures, exposure_node_hours)
        others = [v for k, v in self.jobs.items() if k != key]
        return sum(f for f, _ in others), sum(e for _, e in others)


#: Where the operator keeps it in kopf's memo.
HISTORY_MEMO = "cluster_failure_history"


def cluster_history(memo: dict[str, Any]) -> ClusterFailureHistory:
    history = memo.get(HISTORY_MEMO)
    if history is None:
        history = memo[HISTORY_MEMO] = ClusterFailureHistory()
    assert isinstance(history, ClusterFailureHistory)
    return history
