"""Federated learning: FedCompass scheduling, robust aggregation, the aggregator service, a client SDK.

The modules split along what runs where:

- `speed`, `scheduler` and `aggregation` are pure (no I/O): the FederatedRound controller and the
  aggregator call them with plain values and act on the decisions they return.
- `aggregator` is the aiohttp service that receives client updates and writes the global model.
- `client` is the small SDK an FL client process runs.
- `evaluation` is the simulated experiment behind `docs/results/federated.md`.
"""
