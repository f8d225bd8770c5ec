"""From a ServingPool spec to a plan and its conditions: the reconciler's view of the planner.

Planning is pure and lives in `ampacity.serving.pool_plan`, so `ampacity plan -f` (a preview that
needs no cluster) runs exactly what the reconciler runs, conditions included.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from ampacity.api.servingpool import ServingPoolSpec
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
    "PlanMemo",
    "PlanningError",
    "SizedPlan",
    "plan_pool",
    "record_plan",
    "record_planning_error",
]


class PlanMemo:
    """The plans this operator made, by their inputs (the spec and the latency profile's text).

    The planner remembers its own results too, but a pool reaches it only through the operator's
    planning lock and a thread. Under a burst of creates the event loop is busy, each of those
    hand-overs waits its turn, and 300 equal pools waited up to 40 s for a plan that took one
    lookup. A pool whose inputs were planned before takes the plan here, without either.
    """

    SIZE = 256

    def __init__(self) -> None:
        self._plans: OrderedDict[str, SizedPlan] = OrderedDict()

    @staticmethod
    def _key(spec: ServingPoolSpec, profile: str | None) -> str:
        return f"{spec.model_dump_json()}\0{profile or ''}"

    def get(self, spec: ServingPoolSpec, profile: str | None) -> SizedPlan | None:
        key = self._key(spec, profile)
        sized = self._plans.get(key)
        if sized is None:
            return None
        self._plans.move_to_end(key)
        # Each pool gets its own plan object: its status holds it.
        return dataclasses.replace(sized, plan=sized.plan.model_copy())

    def put(self, spec: ServingPoolSpec, profile: str | None, sized: SizedPlan) -> None:
        self._plans[self._key(spec, profile)] = dataclasses.replace(sized, plan=sized.plan.model_copy())
        if len(self._plans) > self.SIZE:
            self._plans.popitem(last=False)
