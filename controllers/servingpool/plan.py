"""From a ServingPool spec to a plan and its conditions: the reconciler's view of the planner.

Planning is pure and lives in `ampacity.serving.pool_plan`, so `ampacity plan -f` (a preview that
needs no cluster) runs exactly what the reconciler runs, conditions included.
"""

from __future__ import annotations

from ampacity.serving.pool_plan import (
    LATENCY_MODEL,
    LATENCY_PROFILE_INVALID,
    PLANNED_CONDITION,
    LatencyProfileError,
    PlanningError,
    SizedPlan,
    plan_pool,
    record_plan,
    record_planning_error,
)

__all__ = [
    "LATENCY_MODEL",
    "LATENCY_PROFILE_INVALID",
    "PLANNED_CONDITION",
    "LatencyProfileError",
    "PlanningError",
    "SizedPlan",
    "plan_pool",
    "record_plan",
    "record_planning_error",
]
