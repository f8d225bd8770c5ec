import numpy as np
import pytest

from ampacity.training.retention import CheckpointRecord, RetentionPolicy, plan_retention


def records(*steps: tuple[int, bool]) -> list[CheckpointRecord]:
    return [CheckpointRecord(step, complete, float(step)) for step, complete in steps]


def test_keeps_last_n_complete_and_the_in_progress_one() -> None:
    plan = plan_retention(
        records((100, True), (200, True), (300, True), (400, False)), RetentionPolicy(keep_last=2)
    )
    assert plan.keep == (200, 300, 400)
    assert plan.delete == (100,)


def test_torn_checkpoints_older_than_the_latest_complete_are_deleted() -> None:
    plan = plan_retention(records((100, True), (200, False), (300, True)), RetentionPolicy(keep_last=5))
    assert plan.delete == (200,)


def test_latest_complete_survives_even_when_newer_ones_are_incomplete() -> None:
    plan = plan_retention(records((100, True), (200, False), (300, False)), RetentionPolicy(keep_last=1))
    assert plan.keep == (100, 200, 300)


def test_keep_every_keeps_the_first_checkpoint_of_each_window() -> None:
    # Irregular steps, as the auto interval produces: windows of 1000 steps.
    steps = [(s, True) for s in (0, 420, 950, 1010, 1500, 2990, 3000, 3400)]
    plan = plan_retention(records(*steps), RetentionPolicy(keep_last=1, keep_every=1000))
    assert plan.keep == (0, 1010, 2990, 3000, 3400)


def test_nothing_is_deleted_before_the_first_complete_checkpoint() -> None:
    plan = plan_retention(records((100, False), (200, False)), RetentionPolicy(keep_last=1))
    assert plan.delete == ()


def test_never_deletes_latest_complete_or_newer_in_progress_randomised() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        steps = sorted(rng.choice(10_000, size=int(rng.integers(1, 20)), replace=False).tolist())
        recs = [CheckpointRecord(s, bool(rng.random() < 0.7), float(s)) for s in steps]
        policy = RetentionPolicy(
            keep_last=int(rng.integers(1, 4)),
            keep_every=int(rng.integers(1, 3000)) if rng.random() < 0.5 else 0,
        )
        plan = plan_retention(recs, policy)
        assert set(plan.keep) | set(plan.delete) == set(steps)
        assert not set(plan.keep) & set(plan.delete)
        complete = [r.step for r in recs if r.complete]
        if complete:
            assert max(complete) in plan.keep
            assert all(r.step in plan.keep for r in recs if r.step > max(complete))
            assert len([s for s in plan.keep if s in complete]) >= min(policy.keep_last, len(complete))
        else:
            assert plan.delete == ()


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        RetentionPolicy(keep_last=0)
    with pytest.raises(ValueError):
        RetentionPolicy(keep_every=-1)
    with pytest.raises(ValueError):
        plan_retention(records((1, True), (1, False)), RetentionPolicy())
