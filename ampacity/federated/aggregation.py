"""Robust aggregation rules and update validation, over plain numpy arrays (no I/O).

Updates are model *deltas* (client model minus the global model it started from), flattened to one
vector per client. The rules:

- `weighted_mean`: FedAvg (McMahan et al., 2017). One attacker can move it arbitrarily far.
- `trimmed_mean`: coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the
  `k` largest and `k` smallest values before averaging; bounded while attackers number at most `k`.
- `coordinate_median`: coordinate-wise median (Yin et al., 2018); bounded while attackers are a
  minority.
- `krum` / multi-Krum (Blanchard et al., NeurIPS 2017): pick the update(s) whose `n - f - 2`
  nearest neighbours are closest; needs `n > 2f + 2`.

Validation runs before an update is stored, so a malformed or poisoned payload is refused with a
reason and never reaches a rule.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float64]
Params = Mapping[str, npt.NDArray[np.generic]]


class Rule(enum.StrEnum):
    """The aggregation rule a FederatedRound names (values as spelled in its spec)."""

    MEAN = "mean"
    TRIMMED_MEAN = "trimmedMean"
    MEDIAN = "median"
    KRUM = "krum"
    MULTI_KRUM = "multiKrum"


def _stack(updates: Sequence[npt.ArrayLike]) -> Vector:
    if len(updates) == 0:
        raise ValueError("no updates to aggregate")
    stacked = np.stack([np.asarray(u, dtype=np.float64).ravel() for u in updates])
    return stacked


def weighted_mean(updates: Sequence[npt.ArrayLike], weights: Sequence[float] | None = None) -> Vector:
    """Weighted average of the updates; `weights` (e.g. sample counts) default to equal."""
    stacked = _stack(updates)
    w = np.ones(len(stacked)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(stacked),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be one non-negative value per update with a positive sum")
    result: Vector = (w[:, None] * stacked).sum(axis=0) / w.sum()
    return result


def trimmed_mean(updates: Sequence[npt.ArrayLike], trim: int) -> Vector:
    """Coordinate-wise mean after dropping the `trim` largest and `trim` smallest values."""
    stacked = _stack(updates)
    n = len(stacked)
    if trim < 0 or 2 * trim >= n:
        raise ValueError(f"cannot trim {trim} from each side of {n} updates")
    ordered = np.sort(stacked, axis=0)
    result: Vector = ordered[trim : n - trim].mean(axis=0)
    return result


def coordinate_median(updates: Sequence[npt.ArrayLike]) -> Vector:
    """Coordinate-wise median."""
    result: Vector = np.median(_stack(updates), axis=0)
    return result


def krum_scores(updates: Sequence[npt.ArrayLike], byzantine: int) -> Vector:
    """Krum score per update: the sum of squared distances to its `n - f - 2` nearest others."""
    stacked = _stack(updates)
    n = len(stacked)
    if n <= 2 * byzantine + 2:
        raise ValueError(f"Krum needs more than 2f+2 = {2 * byzantine + 2} updates, got {n}")
    sq = (stacked**2).sum(axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * stacked @ stacked.T, 0.0)
    np.fill_diagonal(dist, np.inf)
    neighbours = n - byzantine - 2
    scores: Vector = np.sort(dist, axis=1)[:, :neighbours].sum(axis=1)
    return scores


def krum(updates: Sequence[npt.ArrayLike], byzantine: int, select: int = 1) -> Vector:
    """Krum (`select=1`) or multi-Krum: the mean of the `select` updates with the lowest scores."""
    scores = krum_scores(updates, byzantine)
    if not 1 <= select <= len(scores):
        raise ValueError(f"multi-Krum cannot select {select} of {len(scores)} updates")
    chosen = np.argsort(scores, kind="stable")[:select]
    result: Vector = _stack(updates)[chosen].mean(axis=0)
    return result


def aggregate(
    rule: Rule,
    updates: Sequence[npt.ArrayLike],
    weights: Sequence[float] | None = None,
    byzantine: int = 0,
    trim_fraction: float = 0.0,
) -> Vector:
    """Apply `rule`, tolerating up to `byzantine` attackers where the rule takes that parameter.

    Trimmed mean trims `max(byzantine, floor(trim_fraction * n))` from each side, so the declared
    attacker count is always covered whatever the fraction; multi-Krum averages the `n - f` best-scored
    updates (El Mhamdi et al., 2018). Only the mean uses `weights`: the robust rules treat every
    client as one vote, because a sample count is itself something an attacker could inflate.
    """
    if rule is Rule.MEAN:
        return weighted_mean(updates, weights)
    if rule is Rule.TRIMMED_MEAN:
        return trimmed_mean(updates, max(byzantine, math.floor(trim_fraction * len(updates))))
    if rule is Rule.MEDIAN:
        return coordinate_median(updates)
    if rule is Rule.KRUM:
        return krum(updates, byzantine, 1)
    return krum(updates, byzantine, max(1, len(updates) - byzantine))


def max_tolerated(rule: Rule, n: int) -> int:
    """The largest attacker count `rule` is defined for with `n` updates (0 for the mean)."""
    if rule in (Rule.KRUM, Rule.MULTI_KRUM):
        return max(0, (n - 3) // 2)
    if rule in (Rule.TRIMMED_MEAN, Rule.MEDIAN):
        return max(0, (n - 1) // 2)
    return 0


def flatten(params: Params) -> Vector:
    """Concatenate the named arrays (in sorted name order) into one float64 vector."""
    return np.concatenate([np.asarray(params[k], dtype=np.float64).ravel() for k in sorted(params)])


def unflatten(vector: npt.ArrayLike, like: Params) -> dict[str, npt.NDArray[np.generic]]:
    """Split `vector` back into arrays shaped and typed like `like` (the inverse of `flatten`)."""
    flat = np.asarray(vector)
    out: dict[str, npt.NDArray[np.generic]] = {}
    offset = 0
    for key in sorted(like):
        ref = np.asarray(like[key])
        out[key] = flat[offset : offset + ref.size].reshape(ref.shape).astype(ref.dtype)
        offset += ref.size
    if offset != flat.size:
        raise ValueError(f"vector has {flat.size} values, the model has {offset}")
    return out


#: What `check_update` can find wrong with an update (metric labels, so a fixed set).
PROBLEMS = ("wrong_names", "wrong_shape", "wrong_dtype", "non_finite", "norm_exceeded")


@dataclass(frozen=True)
class Problem:
    """Why an update cannot be aggregated: `kind` is one of PROBLEMS, `reason` says it in words."""

    kind: str
    reason: str


def check_update(update: Params, reference: Params, max_norm: float | None = None) -> Problem | None:
    """Why `update` cannot be aggregated against the global model `reference`, or None if it can.

    Checks names, shape, dtype (exact: a float64 delta for a float32 model is a client bug, and
    silently casting it hides that), that every value is finite, and an L2-norm bound: a bound is the
    cheap defence against scaled poisoning and against overflow in the mean.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return Problem(
            "wrong_names",
            f"parameter names differ from the global model: missing {missing}, unexpected {extra}",
        )
    squared = 0.0
    for key in sorted(reference):
        got, want = np.asarray(update[key]), np.asarray(reference[key])
        if got.shape != want.shape:
            return Problem(
                "wrong_shape", f"parameter {key!r} has shape {list(got.shape)}, expected {list(want.shape)}"
            )
        if got.dtype != want.dtype:
            return Problem("wrong_dtype", f"parameter {key!r} has dtype {got.dtype}, expected {want.dtype}")
        if not np.issubdtype(got.dtype, np.floating):
            return Problem("wrong_dtype", f"parameter {key!r} has non-float dtype {got.dtype}")
        if not np.all(np.isfinite(got)):
            return Problem("non_finite", f"parameter {key!r} contains NaN or infinite values")
        squared += float(np.sum(np.square(got, dtype=np.float64)))
    norm = math.sqrt(squared)
    if max_norm is not None and norm > max_norm:
        return Problem("norm_exceeded", f"update L2 norm {norm:.4g} exceeds the limit {max_norm:.4g}")
    return None


def validate_update(update: Params, reference: Params, max_norm: float | None = None) -> str | None:
    """`check_update`'s reason alone."""
    problem = check_update(update, reference, max_norm)
    return None if problem is None else problem.reason
