"""Run a Flower client unchanged under Ampacity's client: the adapter from Flower's `fit` to a TrainFn.

A Flower `NumPyClient` (`fit(parameters, config) -> (parameters, num_examples, metrics)`) is driven
through Flower's own `Client` wrapper (`NumPyClient.to_client()`), with a real `FitIns` built by
Flower's own `ndarrays_to_parameters`, so Flower's return-type checks and serialisation run exactly
as under a Flower server. The adapter maps:

- the global model's named arrays (in the order the aggregator stores them) to Flower's list of
  NDArrays, and the list `fit` returns back to the names (a length mismatch is an error, not a guess);
- the assignment to `config`: `local_steps`, `round_id`, `model_version` and Flower's `server_round`;
- `num_examples` to the update's weight, and `metrics["accuracy"]` (if a number in [0, 1]) to the
  accuracy the round's status reports.

    from ampacity.federated.flower import flower_train
    client.run_once(flower_train(MyNumPyClient()))
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.client import Client, NumPyClient
from flwr.common import Code, FitIns, ndarrays_to_parameters, parameters_to_ndarrays

from ampacity.federated.aggregator import Arrays
from ampacity.federated.client import TrainFn, TrainResult
from ampacity.federated.wire import Task


class FlowerClientError(RuntimeError):
    """The Flower client's `fit` failed or returned something that does not fit the global model."""


def fit_config(task: Task) -> dict[str, bool | bytes | float | int | str]:
    """The `config` a Flower client's `fit` receives for an Ampacity assignment."""
    return {
        "local_steps": task.local_steps,
        "round_id": task.round_id,
        "model_version": task.model_version,
        "server_round": task.model_version + 1,
    }


def flower_train(client: NumPyClient | Client) -> TrainFn:
    """A TrainFn that trains with a Flower client's `fit`."""
    flower = client.to_client() if isinstance(client, NumPyClient) else client

    def train(params: Arrays, task: Task) -> TrainResult:
        names = list(params)
        ins = FitIns(ndarrays_to_parameters([params[n] for n in names]), fit_config(task))
        res = flower.fit(ins)
        if res.status.code != Code.OK:
            raise FlowerClientError(f"the Flower client's fit failed: {res.status.message}")
        arrays = parameters_to_ndarrays(res.parameters)
        if len(arrays) != len(names):
            raise FlowerClientError(
                f"fit returned {len(arrays)} arrays for a model of {len(names)} ({', '.join(names)})"
            )
        raw = res.metrics.get("accuracy")
        accuracy = float(raw) if isinstance(raw, int | float) and math.isfinite(raw) else None
        if accuracy is not None and not 0 <= accuracy <= 1:
            accuracy = None
        return TrainResult(dict(zip(names, arrays, strict=True)), int(res.num_examples), accuracy)

    return train


def load_factory(spec: str) -> Callable[..., NumPyClient | Client]:
    """`path/to/file.py:factory` or `package.module:factory`: what builds the Flower client."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"--client wants FILE.py:FACTORY or MODULE:FACTORY, got {spec!r}")
    if where.endswith(".py"):
        path = Path(where)
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot load {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    factory: Any = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{where} has no callable {attr!r}")
    built: Callable[..., NumPyClient | Client] = factory
    return built
