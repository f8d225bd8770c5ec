"""A plain Flower NumPyClient: logistic regression on one shard of scikit-learn's digits.

Nothing in it knows about Ampacity; it runs under a Flower server as it is, and under Ampacity with

    ampacity federated flower-client --client examples/flower_digits.py:make_client \
        --client-arg shard=0 --client-arg shards=4 --url https://... --client-id flower-0 ...
"""

from __future__ import annotations

import numpy as np
from flwr.client import NumPyClient
from sklearn.datasets import load_digits

CLASSES = 10
LEARNING_RATE = 0.05
BATCH = 16


class DigitsClient(NumPyClient):  # type: ignore[misc]
    def __init__(self, shard: int, shards: int, seed: int = 0) -> None:
        x, y = load_digits(return_X_y=True)
        x = x / 16.0
        order = np.random.default_rng(seed).permutation(len(y))
        test, train = order[: len(y) // 5], order[len(y) // 5 :]
        mine = train[shard::shards]
        self.x, self.y = x[mine], y[mine]
        self.test_x, self.test_y = x[test], y[test]
        self.rng = np.random.default_rng([seed, shard])

    def get_parameters(self, config: dict[str, object]) -> list[np.ndarray]:
        return [np.zeros(CLASSES), np.zeros((self.x.shape[1], CLASSES))]

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, object]
    ) -> tuple[list[np.ndarray], int, dict[str, float]]:
        bias, weight = (np.array(p, dtype=np.float64) for p in parameters)
        steps = int(config.get("local_steps", 10))  # type: ignore[call-overload]
        for _ in range(steps):
            batch = self.rng.integers(0, len(self.y), BATCH)
            logits = self.x[batch] @ weight + bias
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(BATCH), self.y[batch]] -= 1
            weight -= LEARNING_RATE * self.x[batch].T @ p / BATCH
            bias -= LEARNING_RATE * p.mean(axis=0)
        accuracy = float(np.mean(np.argmax(self.test_x @ weight + bias, axis=1) == self.test_y))
        return [bias, weight], len(self.y), {"accuracy": accuracy}

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, object]
    ) -> tuple[float, int, dict[str, float]]:
        bias, weight = parameters
        accuracy = float(np.mean(np.argmax(self.test_x @ weight + bias, axis=1) == self.test_y))
        return 1.0 - accuracy, len(self.test_y), {"accuracy": accuracy}


def make_client(shard: str = "0", shards: str = "4", seed: str = "0") -> DigitsClient:
    return DigitsClient(int(shard), int(shards), int(seed))
