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

    def workload(self, requests: int, rate: float, seed: int = 0) -> Workload:
        """`requests` Poisson arrivals at `rate` req/s with lengths resampled from the profile."""
        lengths = Workload(
            self.name, np.zeros(len(self.prompts)), np.array(self.prompts), np.array(self.outputs)
        )
        return synthetic(requests, rate, lengths, seed=seed, name=self.name)


def profile_from_trace(name: str) -> LengthProfile:
    sample = load_trace(name).thin(PROFILE_SIZE)
    return LengthProfile(
        name, SOURCES[name], tuple(int(p) for p in sample.prompts), tuple(int(o) for o in sample.outputs)
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
    return LengthProfile(name, data["source"], tuple(data["prompts"]), tuple(data["outputs"]))


def write_profile(profile: LengthProfile) -> Path:
    path = PROFILE_DIR / f"{profile.name}.json"
    body = {"source": profile.source, "prompts": profile.prompts, "outputs": profile.outputs}
    path.write_text(json.dumps(body, separators=(",", ":")) + "\n")
    return path


if __name__ == "__main__":
    for trace in SOURCES:
        print(f"wrote {write_profile(profile_from_trace(trace))}")
