"""Operator metrics, in the controller-runtime style, plus per-object gauges.

Per-object gauges carry `namespace` and `name` labels and are removed when the
object is deleted, so a dashboard never shows a pool that no longer exists.
"""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram, Info

import ampacity

RECONCILE_TOTAL = Counter(
    "ampacity_reconcile_total", "Reconciliations by controller and result.", ["controller", "result"]
)
RECONCILE_ERRORS = Counter(
    "ampacity_reconcile_errors_total", "Reconciliations that failed with an error.", ["controller"]
)
RECONCILE_DURATION = Histogram(
    "ampacity_reconcile_duration_seconds",
    "Time spent in one reconciliation.",
    ["controller"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BUILD_INFO = Info("ampacity_build", "Version of the running operator.")
BUILD_INFO.info({"version": ampacity.__version__})

OBJECT_LABELS = ["namespace", "name"]
SERVING_POOL_GPUS = Gauge("ampacity_servingpool_gpus", "GPUs in the ServingPool's plan.", OBJECT_LABELS)
SERVING_POOL_READY_REPLICAS = Gauge(
    "ampacity_servingpool_ready_replicas", "Ready engine instances of the ServingPool.", OBJECT_LABELS
)
TRAINING_JOB_WORKERS = Gauge(
    "ampacity_trainingjob_workers", "Workers running in the TrainingJob's gang.", OBJECT_LABELS
)
TRAINING_JOB_RESTARTS = Gauge(
    "ampacity_trainingjob_restarts", "Gang restarts of the TrainingJob.", OBJECT_LABELS
)
FEDERATED_ROUND_RECEIVED = Gauge(
    "ampacity_federatedround_received_updates", "Updates accepted in the FederatedRound.", OBJECT_LABELS
)
POWER_BUDGET_LIMIT = Gauge(
    "ampacity_powerbudget_limit_watts", "Power limit of the PowerBudget.", OBJECT_LABELS
)
POWER_BUDGET_NODES = Gauge("ampacity_powerbudget_nodes", "Nodes the PowerBudget selects.", OBJECT_LABELS)

#: Gauges to forget when an object of each kind is deleted.
OBJECT_GAUGES: dict[str, tuple[Gauge, ...]] = {
    "ServingPool": (SERVING_POOL_GPUS, SERVING_POOL_READY_REPLICAS),
    "TrainingJob": (TRAINING_JOB_WORKERS, TRAINING_JOB_RESTARTS),
    "FederatedRound": (FEDERATED_ROUND_RECEIVED,),
    "PowerBudget": (POWER_BUDGET_LIMIT, POWER_BUDGET_NODES),
}


def forget_object(kind: str, namespace: str, name: str) -> None:
    for gauge in OBJECT_GAUGES[kind]:
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
