"""Node agents: the per-node DaemonSet processes that read GPU power and enforce caps.

`agents.gpu` is the hardware seam: NVML on real GPUs, a calibrated simulation elsewhere.
"""
