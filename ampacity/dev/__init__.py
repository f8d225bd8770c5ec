"""The developer harness: the local control plane, the demo and the benchmarks that start clusters.

Product code (the policies, the API, the operator, the agents) never imports this package; the
import contracts in pyproject.toml check it."""
