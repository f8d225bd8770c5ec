"""ServingPool: plan the pool, run its engines, resize them from live metrics."""
