"""Studies of the federated strategies and aggregation rules."""
