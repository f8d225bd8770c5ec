"""Request-length profiles shipped with the operator, for planning without the trace files.

The planner needs a sample of (prompt, output) lengths. The operator image does
not carry the public traces, so each profile keeps a fixed, evenly spread
sample of a trace's requests, pairs intact (prompt and output lengths are
correlated). `python -m ampacity.serving.lengths` rewrites them from the traces;
a test fails if they drift.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ampacity.serving.workload import Workload, load_trace, synthetic

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
PROFILE_SIZE = 512
SOURCES = {
    "azure-conv": "Azure LLM inference trace 2023, conversation (CC-BY-4.0)",
    "mooncake": "Mooncake synthetic trace (Apache-2.0)",
}


@dataclass(frozen=True)
class LengthProfile:
    name: str
    source: str
    prompts: tuple[int, ...]
    outputs: tuple[int, ...]
    longest_prompt: int = 0
    """The trace's longest prompt (the sample may miss it): what a prefill instance must hold."""
    longest_request: int = 0
    """The trace's longest prompt + output: what a decode instance must hold."""
    burstiness: float = 1.0
    """Coefficient of variation of the trace's gaps between arrivals."""

    def workload(
        self, requests: int, rate: float, seed: int = 0, burstiness: float | None = None
    ) -> Workload:
        """`requests` gamma arrivals at `rate` req/s (the trace's burstiness unless given) with
        lengths resampled from the profile."""
        lengths = Workload(
            self.name, np.zeros(len(self.prompts)), np.array(self.prompts), np.array(self.outputs)
        )
        cv = burstiness if burstiness is not None else self.burstiness
        return synthetic(requests, rate, lengths, burstiness=cv, seed=seed, name=self.name)


def arrival_burstiness(workload: Workload) -> float:
    """Coefficient of variation of the gaps between arrivals (1 for Poisson)."""
    gaps = np.diff(workload.arrivals)
    return float(gaps.std() / gaps.mean()) if len(gaps) > 1 and gaps.mean() > 0 else 1.0


def profile_from_trace(name: str) -> LengthProfile:
    trace = load_trace(name)
    sample = trace.thin(PROFILE_SIZE)
    return LengthProfile(
        name,
        SOURCES[name],
        tuple(int(p) for p in sample.prompts),
        tuple(int(o) for o in sample.outputs),
        longest_prompt=int(trace.prompts.max()),
        longest_request=int((trace.prompts + trace.outputs).max()),
        burstiness=round(arrival_burstiness(trace), 4),
    )


@functools.cache
def load_profile(name: str) -> LengthProfile:
    """A shipped profile by trace name (`azure-conv`, `mooncake`).

    Cached: the reconciler asks on every pass, and the files ship with the package.
    """
    path = PROFILE_DIR / f"{name}.json"
    if not path.exists():
        raise KeyError(f"unknown workload profile {name!r}; known: {', '.join(sorted(SOURCES))}")
    data = json.loads(path.read_text())
    return LengthProfile(
        name,
        data["source"],
        tuple(data["prompts"]),
        tuple(data["outputs"]),
        longest_prompt=data["longest_prompt"],
        longest_request=data["longest_request"],
        burstiness=data["burstiness"],
    )


def write_profile(profile: LengthProfile) -> Path:
    path = PROFILE_DIR / f"{profile.name}.json"
    body = {
        "source": profile.source,
        "longest_prompt": profile.longest_prompt,
        "longest_request": profile.longest_request,
        "burstiness": profile.burstiness,
        "prompts": profile.prompts,
        "outputs": profile.outputs,
    }
    path.write_text(json.dumps(body, separators=(",", ":")) + "\n")
    return path


def quantile_points(values: np.ndarray) -> list[tuple[float, int]]:
    """(percentile, tokens) points summarising a length sample, the 100th included."""
    marks = (1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 100.0)
    return [(m, int(np.ceil(np.percentile(values, m)))) for m in marks]


def sample_points(points: Sequence[tuple[float, int]], n: int) -> np.ndarray:
    """n lengths whose empirical quantiles follow the (percentile, tokens) points, deterministically.

    Between two points the quantile function is interpolated in log-length (lengths spread over
    orders of magnitude); below the lowest point it holds that point's length. The sample is the
    quantile function at evenly spaced probabilities ending at 1, so the longest point is in it.
    """
    pts = sorted((float(p), int(t)) for p, t in points)
    tokens = np.maximum.accumulate(np.array([t for _, t in pts], dtype=np.float64))
    levels = np.array([p / 100 for p, _ in pts])
    probabilities = (np.arange(1, n + 1)) / n
    values = np.exp(np.interp(probabilities, levels, np.log(tokens)))
    return np.maximum(1, np.round(values)).astype(np.int64)


def histogram_points(buckets: Sequence[tuple[int, int]]) -> list[tuple[float, int]]:
    """A histogram ((upper bound, count), increasing bounds) as (percentile, tokens) points."""
    ordered = sorted(buckets)
    counts = np.cumsum([c for _, c in ordered], dtype=np.float64)
    total = counts[-1]
    return [(100 * c / total, bound) for (bound, _), c in zip(ordered, counts, strict=True) if c > 0]


def distribution_profile(
    name: str, prompt_points: Sequence[tuple[float, int]], output_points: Sequence[tuple[float, int]]
) -> LengthProfile:
    """A profile from the user's length distributions: prompts and outputs drawn independently
    (a distribution carries no correlation between them), shuffled so long prompts are not all
    paired with long outputs."""
    prompts = sample_points(prompt_points, PROFILE_SIZE)
    outputs = np.random.default_rng(0).permutation(sample_points(output_points, PROFILE_SIZE))
    longest_prompt = max(t for _, t in prompt_points)
    longest_output = max(t for _, t in output_points)
    return LengthProfile(
        name,
        "the ServingPool's workload.promptTokens and outputTokens",
        tuple(int(p) for p in prompts),
        tuple(int(o) for o in outputs),
        longest_prompt=longest_prompt,
        longest_request=longest_prompt + longest_output,
    )


if __name__ == "__main__":
    for trace in SOURCES:
        print(f"wrote {write_profile(profile_from_trace(trace))}")
