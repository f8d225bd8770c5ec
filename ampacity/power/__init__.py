"""POLCA-style GPU power oversubscription: the pure parts.

Everything here is a pure function of plain frozen dataclasses, so the PowerBudget
controller and the node agent can call it without Kubernetes in the loop:

- `budget` / `telemetry`: what a PowerBudget declares and what an agent reports per GPU.
- `policy.evaluate`: telemetry + budget + priorities + previous state -> per-GPU caps,
  new state, threshold crossings and a budget summary (POLCA, Patel et al., ASPLOS 2024).
- `failsafe.failsafe_cap`: the cap an agent applies when its assignment is stale.
- `calibration` / `gpu_model`: the simulated GPU (power vs load and cap, throughput vs cap),
  calibrated on the Zeus cap sweeps and the Splitwise per-phase power.
- `simulation`: the row-level evaluation (how many servers fit under one breaker).
"""
