"""The agent's fail-safe: when the assignment cannot be trusted, fall back to the safe cap."""

from __future__ import annotations

from ampacity.power.budget import BudgetSpec, PriorityClass
from ampacity.power.failsafe import failsafe_cap, safe_cap_watts

CLASSES = (PriorityClass("training", 0, 300.0), PriorityClass("serving", 1, 500.0))
BUDGET = BudgetSpec(limit_watts=10_000.0, classes=CLASSES, staleness_seconds=30.0)


def decide(budget: BudgetSpec = BUDGET, **overrides: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "assigned_cap_watts": 600.0,
        "assigned_at": 100.0,
        "now": 110.0,
        "api_reachable": True,
        "min_limit_watts": 200.0,
        "max_limit_watts": 700.0,
        "total_gpus": 16,
    } | overrides
    return failsafe_cap(budget, **args)  # type: ignore[arg-type]


def test_fresh_assignment_stands() -> None:
    decision = decide()
    assert (decision.cap_watts, decision.failsafe) == (600.0, False)


def test_stale_assignment_falls_back_to_an_even_split_of_t1() -> None:
    decision = decide(now=131.0)
    # T1 = 8.5 kW over 16 GPUs = 531.25 W, tighter than the 600 W assignment.
    assert decision.failsafe and decision.cap_watts == 531.25
    assert "old" in decision.reason


def test_unreachable_api_server_triggers_failsafe_even_with_a_fresh_assignment() -> None:
    decision = decide(api_reachable=False)
    assert decision.failsafe and decision.reason == "API server unreachable"


def test_failsafe_never_loosens_a_tighter_assignment() -> None:
    decision = decide(assigned_cap_watts=400.0, now=200.0)
    assert decision.failsafe and decision.cap_watts == 400.0


def test_no_assignment_yet_uses_the_safe_cap() -> None:
    decision = decide(assigned_cap_watts=None, assigned_at=None)
    assert decision.failsafe and decision.cap_watts == 531.25


def test_declared_safe_cap_wins_and_is_clamped_to_the_settable_range() -> None:
    declared = BudgetSpec(limit_watts=10_000.0, classes=CLASSES, safe_cap_watts=150.0)
    assert safe_cap_watts(declared, 200.0, 700.0, total_gpus=16) == 200.0
    assert decide(declared, api_reachable=False).cap_watts == 200.0


def test_unknown_gpu_count_without_declared_cap_uses_the_minimum_limit() -> None:
    assert safe_cap_watts(BUDGET, 200.0, 700.0, total_gpus=None) == 200.0
    # Few GPUs: the even split exceeds the max limit, so the max limit it is.
    assert safe_cap_watts(BUDGET, 200.0, 700.0, total_gpus=4) == 700.0
