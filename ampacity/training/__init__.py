"""Training support for the TrainingJob controller and the training script.

Pure policy (no Kubernetes, no I/O beyond reading a trace): the checkpoint interval
(`checkpoint_interval`), retention (`retention`), the failure prior from the public
InfiniteHBD fault trace (`failure_trace`) and the waste simulation (`simulation`).
The trainer-side library the training script imports lives in `ampacity.training.sdk`.
"""
