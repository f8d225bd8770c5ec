"""LLM serving pools: latency model, trace-driven simulator and the ServingPool planner.

The reconciler's entry points are `planner.plan` (the best disaggregated and colocated pools for a
workload and SLOs) and `planner.replicas_for_rate` (that pool sized for a request rate); both take
and return plain frozen dataclasses (`Cluster`, `Slo`, `Workload`, `PoolPlan`, pools).
"""
