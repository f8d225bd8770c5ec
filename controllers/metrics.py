"""Operator metrics, in the controller-runtime style, plus per-object gauges.

Per-object gauges carry `namespace` and `name` labels and are removed when the
object is deleted, so a dashboard never shows a pool that no longer exists.
"""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram, Info

import ampacity

ENDPOINT_TLS = Gauge(
    "ampacity_operator_endpoint_tls",
    "1 when the operator's endpoint serves TLS with a certificate from its CA, 0 when plain HTTP.",
    ["endpoint"],
)
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
STATUS_PATCHES_SKIPPED = Counter(
    "ampacity_status_patches_skipped_total",
    "Reconciliations whose computed status equalled the observed one, so no status patch was sent.",
    ["controller"],
)
CHILD_APPLIES_SKIPPED = Counter(
    "ampacity_child_applies_skipped_total",
    "Child applies not sent: the desired child was the one last applied and nobody changed it since.",
    ["controller"],
)
RECONCILE_FAILURES = Counter(
    "ampacity_reconcile_failures_total",
    "Failed reconciliations by the condition reason they set (ApiUnavailable, ApiError, ...).",
    ["controller", "reason"],
)
CACHE_OBJECTS = Gauge("ampacity_cache_objects", "Objects held by the operator's read cache.", ["kind"])
CACHE_LISTS = Counter("ampacity_cache_lists_total", "Full (paginated) lists the read cache made.", ["kind"])
CACHE_RELISTS = Counter(
    "ampacity_cache_relists_total", "Lists the read cache made again after 410 Gone.", ["kind"]
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


# PowerBudget power state, set on every policy round (not only on the timer).
POWER_BUDGET_POWER = Gauge(
    "ampacity_powerbudget_power_watts", "Total GPU power of the budget.", OBJECT_LABELS
)
POWER_BUDGET_PEAK = Gauge("ampacity_powerbudget_peak_watts", "Highest total GPU power seen.", OBJECT_LABELS)
POWER_BUDGET_HEADROOM = Gauge(
    "ampacity_powerbudget_headroom_watts", "Limit minus current power of the budget.", OBJECT_LABELS
)
POWER_BUDGET_CAPPED_GPUS = Gauge("ampacity_powerbudget_capped_gpus", "GPUs under a cap.", OBJECT_LABELS)
POWER_BUDGET_LEVEL = Gauge(
    "ampacity_powerbudget_level", "Threshold the budget's power is above: 0 none, 1 T1, 2 T2.", OBJECT_LABELS
)
POWER_BUDGET_CROSSINGS = Counter(
    "ampacity_powerbudget_threshold_crossings_total",
    "Threshold crossings and telemetry changes, by Event reason (EnteredT1, ExitedT2, LimitExceeded, ...).",
    [*OBJECT_LABELS, "reason"],
)
POWER_BUDGET_UNENFORCED_NODES = Gauge(
    "ampacity_powerbudget_unenforced_nodes",
    "Nodes of the budget whose agent cannot apply caps (NVML missing or refusing).",
    OBJECT_LABELS,
)
POWER_BUDGET_ROUND_DURATION = Histogram(
    "ampacity_powerbudget_round_duration_seconds",
    "Time for one capping round: telemetry to assignments written.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
OBJECT_GAUGES["PowerBudget"] = (
    *OBJECT_GAUGES["PowerBudget"],
    POWER_BUDGET_POWER,
    POWER_BUDGET_PEAK,
    POWER_BUDGET_HEADROOM,
    POWER_BUDGET_CAPPED_GPUS,
    POWER_BUDGET_LEVEL,
    POWER_BUDGET_UNENFORCED_NODES,
)


# ServingPool objectives and plan, for the SLO recording rules and alerts (rules/ampacity.rules.yaml).
SERVING_POOL_REPLICAS = Gauge(
    "ampacity_servingpool_replicas", "Engine instances the ServingPool's plan asks for.", OBJECT_LABELS
)
SERVING_POOL_PREDICTED_ATTAINMENT = Gauge(
    "ampacity_servingpool_predicted_slo_attainment_ratio",
    "Predicted fraction of requests meeting both latency objectives under the plan.",
    OBJECT_LABELS,
)
SERVING_POOL_ATTAINMENT_OBJECTIVE = Gauge(
    "ampacity_servingpool_slo_attainment_objective_ratio",
    "Fraction of requests that must meet both latency objectives (spec.slo.attainment).",
    OBJECT_LABELS,
)
SERVING_POOL_CAPACITY = Gauge(
    "ampacity_servingpool_capacity_requests_per_second",
    "Requests per second the planned pool sustains.",
    OBJECT_LABELS,
)
SERVING_POOL_MEASURED_ATTAINMENT = Gauge(
    "ampacity_servingpool_measured_slo_attainment_ratio",
    "Measured fraction of the last interval's requests within the latency objectives (the tighter of "
    "TTFT and TPOT), from the engines' histograms; absent until two scrapes of an autoscaled pool.",
    OBJECT_LABELS,
)
SERVING_POOL_METRICS_UP = Gauge(
    "ampacity_servingpool_metrics_up",
    "1 when the last scrape of the pool's engines read at least one engine, 0 when none answered.",
    OBJECT_LABELS,
)
OBJECT_GAUGES["ServingPool"] = (
    *OBJECT_GAUGES["ServingPool"],
    SERVING_POOL_MEASURED_ATTAINMENT,
    SERVING_POOL_METRICS_UP,
    SERVING_POOL_REPLICAS,
    SERVING_POOL_PREDICTED_ATTAINMENT,
    SERVING_POOL_ATTAINMENT_OBJECTIVE,
    SERVING_POOL_CAPACITY,
)

# Error counters exist at zero from start-up, so rate() and alerts see the first error.
for _controller in ("servingpool", "trainingjob", "federatedround", "powerbudget"):
    RECONCILE_ERRORS.labels(_controller)

TRAINING_JOB_GPU_SECONDS_LOST = Gauge(
    "ampacity_trainingjob_gpu_seconds_lost",
    "GPU-seconds of work the TrainingJob lost to failures.",
    OBJECT_LABELS,
)
TRAINING_JOB_CHECKPOINT_INTERVAL = Gauge(
    "ampacity_trainingjob_checkpoint_interval_seconds", "Checkpoint interval in force.", OBJECT_LABELS
)
OBJECT_GAUGES["TrainingJob"] += (TRAINING_JOB_GPU_SECONDS_LOST, TRAINING_JOB_CHECKPOINT_INTERVAL)

# Checkpoint age and round deadlines, for the alerts in rules/ampacity.rules.yaml.
TRAINING_JOB_LAST_CHECKPOINT = Gauge(
    "ampacity_trainingjob_last_checkpoint_timestamp_seconds",
    "Unix time of the TrainingJob's latest complete (committed) checkpoint; absent before the first.",
    OBJECT_LABELS,
)
OBJECT_GAUGES["TrainingJob"] += (TRAINING_JOB_LAST_CHECKPOINT,)
FEDERATED_ROUND_DEADLINE = Gauge(
    "ampacity_federatedround_deadline_timestamp_seconds",
    "Unix time of the FederatedRound's deadline, once the round is open.",
    OBJECT_LABELS,
)
FEDERATED_ROUND_OPEN = Gauge(
    "ampacity_federatedround_open",
    "1 while the FederatedRound is open (Training or Aggregating), 0 otherwise.",
    OBJECT_LABELS,
)
OBJECT_GAUGES["FederatedRound"] += (FEDERATED_ROUND_DEADLINE, FEDERATED_ROUND_OPEN)
