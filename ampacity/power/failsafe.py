"""What a node agent enforces when it cannot trust its assignment.

The agent calls `failsafe_cap` every control period. While the API server is reachable
and the assignment is younger than the budget's staleness, the assignment stands. Otherwise
the agent falls back to the budget's safe cap, a limit chosen so that the row stays under
T1 even if every agent in the budget fails over at once, and reports that it did.
"""

from __future__ import annotations

from dataclasses import dataclass

from ampacity.power.budget import BudgetSpec


@dataclass(frozen=True)
class CapDecision:
    """The limit to enforce, whether it is the fail-safe one, and why (for status/logs)."""

    cap_watts: float
    failsafe: bool
    reason: str


def safe_cap_watts(
    budget: BudgetSpec, min_limit_watts: float, max_limit_watts: float, total_gpus: int | None
) -> float:
    """The budget's declared safe cap, or else an even split of T1 over the budget's GPUs.

    Without either (no declared cap and an unknown GPU count) only the GPU's minimum
    settable limit is guaranteed safe. The result is clamped to the settable range.
    """
    if budget.safe_cap_watts is not None:
        cap = budget.safe_cap_watts
    elif total_gpus:
        cap = budget.t1_watts / total_gpus
    else:
        cap = min_limit_watts
    return min(max(cap, min_limit_watts), max_limit_watts)


def failsafe_cap(
    budget: BudgetSpec,
    *,
    assigned_cap_watts: float | None,
    assigned_at: float | None,
    now: float,
    api_reachable: bool,
    min_limit_watts: float,
    max_limit_watts: float,
    total_gpus: int | None,
) -> CapDecision:
    """Decide the limit for one GPU from its last assignment (cap and issue time, or None).

    In fail-safe the GPU never loosens: it keeps the tighter of its last assignment and the
    safe cap, because a stale assignment was still the operator's view of a safe limit.
    """
    reason = ""
    if not api_reachable:
        reason = "API server unreachable"
    elif assigned_cap_watts is None or assigned_at is None:
        reason = "no cap assignment yet"
    elif now - assigned_at > budget.staleness_seconds:
        reason = f"assignment {now - assigned_at:.0f}s old (allowed {budget.staleness_seconds:.0f}s)"
    if not reason and assigned_cap_watts is not None:
        return CapDecision(min(max(assigned_cap_watts, min_limit_watts), max_limit_watts), False, "assigned")
    safe = safe_cap_watts(budget, min_limit_watts, max_limit_watts, total_gpus)
    if assigned_cap_watts is not None:
        safe = min(safe, max(assigned_cap_watts, min_limit_watts))
    return CapDecision(safe, True, reason)
