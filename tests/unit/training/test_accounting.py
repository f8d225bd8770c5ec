import pytest

from ampacity.training.accounting import lost_gpu_seconds


def test_lost_gpu_time_counts_redone_steps_and_restart_on_every_gpu() -> None:
    lost = lost_gpu_seconds(
        failed_at_step=1_250, resumed_from_step=1_200, step_seconds=2.0, restart_seconds=300.0, gpus=16
    )
    assert lost == (50 * 2.0 + 300.0) * 16


def test_resuming_from_the_future_is_rejected() -> None:
    with pytest.raises(ValueError):
        lost_gpu_seconds(
            failed_at_step=10, resumed_from_step=20, step_seconds=1.0, restart_seconds=0.0, gpus=1
        )
