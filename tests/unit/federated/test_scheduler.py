import itertools
import math

import pytest

from ampacity.federated import scheduler
from ampacity.federated.scheduler import ClientInfo, CompassPlan, StepBounds
from ampacity.federated.speed import SpeedEstimate, observe

BOUNDS = StepBounds(q_min=5, q_max=40)


def test_speed_estimate_weights_the_newest_sample_by_0_9() -> None:
    first = observe(None, "a", elapsed_s=10.0, steps=10)
    assert first.seconds_per_step == pytest.approx(1.0)
    second = observe(first, "a", elapsed_s=50.0, steps=10)
    assert second.seconds_per_step == pytest.approx(0.9 * 5.0 + 0.1 * 1.0)
    assert second.samples == 2


def test_speed_estimate_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        observe(None, "a", elapsed_s=0.0, steps=3)
    with pytest.raises(ValueError):
        observe(SpeedEstimate("a", 1.0), "b", elapsed_s=1.0, steps=1)


def test_step_bounds_validate() -> None:
    with pytest.raises(ValueError):
        StepBounds(10, 5)


def test_every_assignment_is_within_bounds_and_members_of_a_group_land_together() -> None:
    speeds = {f"c{i}": 1.0 * 39 ** (i / 19) for i in range(20)}
    assignments, plan = scheduler.initial_assignments(speeds, 0.0, BOUNDS)
    assert sorted(a.client_id for a in assignments) == sorted(speeds)
    for a in assignments:
        assert BOUNDS.q_min <= a.local_steps <= BOUNDS.q_max
        finish = a.start_s + a.local_steps * speeds[a.client_id]
        group = plan.group(a.group_id)
        # Lands no later than the group's expected arrival, and less than one step before it.
        assert finish <= group.expected_arrival_s + 1e-9
        assert group.expected_arrival_s - finish < speeds[a.client_id]
    # 39x spread with Q_max/Q_min = 8: more than one group, far fewer than one per client.
    assert 1 < len(plan.groups) < len(speeds)


def test_fastest_client_opens_the_first_group_with_q_max() -> None:
    assignments, plan = scheduler.initial_assignments({"slow": 30.0, "fast": 1.0}, 0.0, BOUNDS)
    fast = next(a for a in assignments if a.client_id == "fast")
    slow = next(a for a in assignments if a.client_id == "slow")
    assert fast.local_steps == BOUNDS.q_max
    # 30 s/step cannot do Q_min steps before t=40, so it opens a later group.
    assert slow.group_id != fast.group_id and slow.local_steps == BOUNDS.q_max
    assert len(plan.groups) == 2


def test_client_joins_the_group_that_allows_the_most_steps() -> None:
    plan = CompassPlan()
    _, plan = scheduler.assign_client(plan, "a", 1.0, 0.0, BOUNDS)  # lands at 40
    _, plan = scheduler.assign_client(plan, "b", 2.0, 0.0, BOUNDS)  # joins at 20 steps
    assignment, plan = scheduler.assign_client(plan, "c", 1.0, 10.0, BOUNDS)
    assert assignment.group_id == 0 and assignment.local_steps == 30
    assert plan.group(0).members == ("a", "b", "c")


def test_latest_arrival_leaves_grace_proportional_to_the_trip() -> None:
    a, _plan = scheduler.assign_client(CompassPlan(), "a", 2.0, 100.0, BOUNDS, lateness=1.5)
    assert a.expected_arrival_s == 180.0
    assert a.deadline_s == pytest.approx(100.0 + 1.5 * 80.0)


def test_group_ready_and_close() -> None:
    _, plan = scheduler.initial_assignments({"a": 1.0, "b": 1.1}, 0.0, BOUNDS)
    group = plan.groups[0]
    assert not scheduler.group_ready(group, ["a"], now_s=group.expected_arrival_s)
    assert scheduler.group_ready(group, ["a", "b"], now_s=group.expected_arrival_s)
    assert scheduler.group_ready(group, ["a"], now_s=group.latest_arrival_s)
    assert scheduler.close_group(plan, group.group_id).groups == ()
    with pytest.raises(KeyError):
        scheduler.close_group(plan, 99)


def test_staleness_weight_is_one_when_fresh_and_strictly_decreasing() -> None:
    weights = [scheduler.staleness_weight(t) for t in range(10)]
    assert weights[0] == 1.0
    assert all(later < earlier for earlier, later in itertools.pairwise(weights))
    assert weights[3] == pytest.approx(1 / math.sqrt(4))
    with pytest.raises(ValueError):
        scheduler.staleness_weight(-1)


def test_synchronous_assignments_give_everyone_q_max() -> None:
    out = scheduler.synchronous_assignments({"a": 1.0, "b": 3.0}, 0.0, BOUNDS, deadline_s=500.0)
    assert [(a.client_id, a.local_steps, a.deadline_s) for a in out] == [("a", 40, 500.0), ("b", 40, 500.0)]


def test_cohort_selection_is_reproducible_filtered_and_varies_by_round() -> None:
    clients = [ClientInfo(f"c{i}", {"zone": "eu" if i % 2 else "us"}) for i in range(40)]
    clients.append(ClientInfo("down", {"zone": "eu"}, available=False))
    first = scheduler.select_cohort(clients, 5, round_index=1, seed=7, selector={"zone": "eu"})
    assert first == scheduler.select_cohort(list(reversed(clients)), 5, 1, 7, {"zone": "eu"})
    assert len(first) == 5 and len(set(first)) == 5
    assert all(int(c[1:]) % 2 == 1 for c in first)
    assert "down" not in scheduler.select_cohort(clients, 100, 1, 7, {"zone": "eu"})
    rounds = {scheduler.select_cohort(clients, 5, r, 7) for r in range(10)}
    assert len(rounds) > 1


def test_quorum() -> None:
    assert scheduler.quorum_met(3, 3)
    assert not scheduler.quorum_met(2, 3)
    assert not scheduler.quorum_met(0, 0)
