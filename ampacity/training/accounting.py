"""GPU-time a failure cost the job, for the TrainingJob status (`gpuSecondsLostToFailures`)."""

from __future__ import annotations


def lost_gpu_seconds(
    *,
    failed_at_step: int,
    resumed_from_step: int,
    step_seconds: float,
    restart_seconds: float,
    gpus: int,
) -> float:
    """The steps redone since the checkpoint resumed from, plus the restart, on every GPU.

    The whole gang stops on one failure, so both the redone work and the downtime are
    paid by all `gpus`. `step_seconds` is the recent step time the trainer reports.
    """
    if resumed_from_step > failed_at_step:
        raise ValueError("resumed from a checkpoint newer than the failure")
    if step_seconds < 0 or restart_seconds < 0 or gpus < 1:
        raise ValueError("step and restart times must be >= 0 and the job needs a GPU")
    redone = (failed_at_step - resumed_from_step) * step_seconds
    return (redone + restart_seconds) * gpus
