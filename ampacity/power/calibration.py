"""Calibration data for the simulated GPU, and the curves fitted to it.

Two public sources (see shared/data/README.md):

- Zeus (You et al., NSDI 2023; ml-energy/zeus `summary_power_{v100,a40}.csv`): time per
  epoch and average power of 121 training jobs (dataset, network, batch size, optimizer, GPU)
  swept over power limits. Normalised per job, they give the cap-to-throughput curve: at a
  cap that is a fraction x of the job's uncapped draw, the job runs at
  y = time(uncapped) / time(cap).
- Splitwise (Patel et al., ISCA 2024; `perf_model.csv`): profiled prompt and token latency of
  Llama-2-70B on 8 H100 (tensor parallel 8), used as the simple serving model of the
  evaluation. Its per-phase power (H100: idle 75 W, prompt 700 W, token 380 W) lives in
  `gpu_model`.
"""

from __future__ import annotations

import csv
import functools
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ampacity.data import trace_path

FloatArray = npt.NDArray[np.float64]

ZEUS_GPUS = ("v100", "a40")
# Cap fractions are binned this finely before fitting: the curve bends between 0.6 and 1.
_BIN_WIDTH = 0.05


@dataclass(frozen=True)
class CapPoint:
    """One Zeus measurement, normalised to its job's run at the highest power limit."""

    gpu: str
    job: str
    cap_fraction: float  # power limit / the job's average power at the highest limit, <= 1
    throughput_fraction: float  # time per epoch at the highest limit / time at this limit


def load_zeus_points() -> list[CapPoint]:
    """All Zeus sweeps that include the GPU's highest power limit, normalised per job."""
    points: list[CapPoint] = []
    for gpu in ZEUS_GPUS:
        jobs: dict[str, dict[float, tuple[float, float]]] = defaultdict(dict)
        with trace_path("zeus", f"summary_power_{gpu}.csv").open(newline="") as f:
            for row in csv.DictReader(f):
                job = "/".join((row["dataset"], row["network"], row["batch_size"], row["optimizer"]))
                limit = float(row["power_limit"])
                jobs[job][limit] = (float(row["time_per_epoch"]), float(row["average_power"]))
        top = max(limit for sweep in jobs.values() for limit in sweep)
        for job, sweep in sorted(jobs.items()):
            if top not in sweep:
                continue
            base_time, base_power = sweep[top]
            for limit, (time, _power) in sorted(sweep.items()):
                points.append(CapPoint(gpu, job, min(1.0, limit / base_power), base_time / time))
    return points


@dataclass(frozen=True)
class CapCurve:
    """Throughput fraction as a piecewise-linear, non-decreasing function of cap fraction.

    Knots are the medians of binned Zeus points made monotone (pool adjacent violators),
    anchored at (0, 0) and (1, 1): a cap at or above the uncapped draw costs nothing.
    """

    knots_x: tuple[float, ...]
    knots_y: tuple[float, ...]

    def __call__(self, cap_fraction: npt.ArrayLike) -> FloatArray:
        x = np.clip(np.asarray(cap_fraction, dtype=np.float64), 0.0, 1.0)
        return np.interp(x, self.knots_x, self.knots_y)

    def at(self, cap_fraction: float) -> float:
        """Scalar form of the curve."""
        return float(self(cap_fraction))


def fit_cap_curve(points: list[CapPoint]) -> CapCurve:
    """Fit the cap curve: per-bin medians of throughput, then made monotone."""
    x = np.array([p.cap_fraction for p in points])
    y = np.array([p.throughput_fraction for p in points])
    capped = x < 1.0
    bins = np.floor(x[capped] / _BIN_WIDTH).astype(int)
    xs: list[float] = [0.0]
    ys: list[float] = [0.0]
    weights: list[float] = [1.0]
    for b in np.unique(bins):
        members = bins == b
        xs.append(float(np.median(x[capped][members])))
        ys.append(float(np.median(y[capped][members])))
        weights.append(float(members.sum()))
    xs.append(1.0)
    ys.append(1.0)
    weights.append(float((~capped).sum()) or 1.0)
    fitted = _pool_adjacent_violators(np.array(ys), np.array(weights))
    fitted[-1] = 1.0  # uncapped is the reference by construction
    fitted[0] = 0.0
    return CapCurve(tuple(xs), tuple(float(v) for v in np.minimum(fitted, 1.0)))


def _pool_adjacent_violators(y: FloatArray, w: FloatArray) -> FloatArray:
    """Weighted isotonic (non-decreasing) regression of `y`."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for value, weight in zip(y, w, strict=True):
        blocks.append([float(value), float(weight), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean2, w2, n2 = blocks.pop()
            mean1, w1, n1 = blocks.pop()
            blocks.append([(mean1 * w1 + mean2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.concatenate([np.full(int(n), mean) for mean, _w, n in blocks])


@functools.cache
def zeus_cap_curve() -> CapCurve:
    """The cap curve fitted on all Zeus points (cached: the CSVs are read once)."""
    return fit_cap_curve(load_zeus_points())


@dataclass(frozen=True)
class ServingProfile:
    """Llama-2-70B on 8 H100 (TP8), uncapped, from the Splitwise profile.

    Prompt time = overhead + tokens * seconds_per_prompt_token (least squares over the
    batch-1 rows); time per output token interpolated over the profiled batch sizes.
    """

    prompt_overhead_s: float
    seconds_per_prompt_token: float
    batch_sizes: tuple[float, ...]
    seconds_per_output_token: tuple[float, ...]

    def time_per_output_token(self, batch: npt.ArrayLike) -> FloatArray:
        """Decode step time at a batch size; beyond the profiled range the step grows
        linearly with the batch (the GPU is saturated, requests share it)."""
        b = np.maximum(np.asarray(batch, dtype=np.float64), 1.0)
        top = self.batch_sizes[-1]
        inside = np.interp(np.minimum(b, top), self.batch_sizes, self.seconds_per_output_token)
        return np.where(b > top, inside * b / top, inside)


@functools.cache
def splitwise_h100_llama70b() -> ServingProfile:
    """Fit `ServingProfile` on Splitwise's `perf_model.csv` (hardware h100-80gb, TP8)."""
    prompt: list[tuple[float, float]] = []
    token: dict[float, list[float]] = defaultdict(list)
    with trace_path("splitwise", "perf_model.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if (row["model"], row["hardware"], row["tensor_parallel"]) != ("llama2-70b", "h100-80gb", "8"):
                continue
            batch = float(row["batch_size"])
            token[batch].append(float(row["token_time"]) / 1000.0)
            if batch == 1:
                prompt.append((float(row["prompt_size"]), float(row["prompt_time"]) / 1000.0))
    tokens = np.array([p[0] for p in prompt])
    seconds = np.array([p[1] for p in prompt])
    slope, intercept = np.polyfit(tokens, seconds, 1)
    batches = sorted(token)
    return ServingProfile(
        prompt_overhead_s=max(0.0, float(intercept)),
        seconds_per_prompt_token=float(slope),
        batch_sizes=tuple(batches),
        seconds_per_output_token=tuple(float(np.median(token[b])) for b in batches),
    )
