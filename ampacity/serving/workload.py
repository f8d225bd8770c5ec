"""Request streams for the simulator: the public traces and a Poisson/gamma generator."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ampacity.data import trace_path


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival: arrival time (s, from 0), prompt and output lengths (tokens)."""

    name: str
    arrivals: np.ndarray
    prompts: np.ndarray
    outputs: np.ndarray

    def __post_init__(self) -> None:
        if not (len(self.arrivals) == len(self.prompts) == len(self.outputs)):
            raise ValueError("arrivals, prompts and outputs must have the same length")
        if len(self.arrivals) and (np.any(np.diff(self.arrivals) < 0) or self.arrivals[0] < 0):
            raise ValueError("arrivals must be sorted and non-negative")
        if np.any(self.prompts < 1) or np.any(self.outputs < 1):
            raise ValueError("every request needs at least one prompt and one output token")

    def __len__(self) -> int:
        return len(self.arrivals)

    @property
    def duration(self) -> float:
        return float(self.arrivals[-1]) if len(self) else 0.0

    @property
    def rate(self) -> float:
        """Mean arrival rate in requests/s."""
        return len(self) / self.duration if self.duration > 0 else float("inf")

    def head(self, n: int) -> Workload:
        """The first n requests: a contiguous window keeps the trace's own burstiness."""
        return Workload(self.name, self.arrivals[:n], self.prompts[:n], self.outputs[:n])

    def thin(self, n: int) -> Workload:
        """n requests spread evenly over the whole trace (every k-th request).

        A sample from the start would miss drift in the mix: Mooncake's prompts average 12k tokens
        in its first quarter and 20k in its last.
        """
        if n >= len(self):
            return self
        picks = np.unique(np.linspace(0, len(self) - 1, n).round().astype(np.int64))
        return Workload(
            self.name,
            self.arrivals[picks] - self.arrivals[picks[0]],
            self.prompts[picks],
            self.outputs[picks],
        )

    def with_burstiness(self, burstiness: float, seed: int = 0) -> Workload:
        """The same requests, in order, with gaps of coefficient of variation `burstiness` that
        follow this workload's own rate over time.

        A unit-rate gamma renewal process (`synthetic`'s) is time-warped through the workload's
        cumulative arrival curve: the rate swings over minutes that a thinned trace keeps survive,
        and the gaps regain the short-term variation thinning smooths away (keeping every k-th
        request of a trace divides the gaps' CV by about the square root of k).
        """
        n = len(self)
        if n < 3:
            return self
        shape = 1.0 / burstiness**2
        gaps = np.random.default_rng(seed).gamma(shape, 1.0 / shape, size=n - 1)
        events = np.concatenate([[0.0], np.cumsum(gaps)])
        events *= (n - 1) / events[-1]
        arrivals = np.interp(events, np.arange(n, dtype=np.float64), self.arrivals)
        return Workload(self.name, arrivals, self.prompts, self.outputs)

    def at_rate(self, rate: float) -> Workload:
        """The same requests with time stretched so the mean rate is `rate` (DistServe's scaling)."""
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        return Workload(self.name, self.arrivals * (self.rate / rate), self.prompts, self.outputs)


def _make(name: str, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray) -> Workload:
    order = np.argsort(arrivals, kind="stable")
    start = arrivals[order[0]] if len(order) else 0.0
    return Workload(
        name,
        (arrivals[order] - start).astype(np.float64),
        np.maximum(prompts[order], 1).astype(np.int64),
        # A few trace rows record zero generated tokens; the prefill still yields one.
        np.maximum(outputs[order], 1).astype(np.int64),
    )


def load_azure(path: Path | None = None, name: str = "azure-conv") -> Workload:
    """Azure LLM inference trace 2023 (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    source = path if path is not None else trace_path("azure-llm-2023", "AzureLLMInferenceTrace_conv.csv")
    with source.open(newline="") as f:
        rows = list(csv.DictReader(f))
    # Seven fractional digits: datetime.fromisoformat would reject them, numpy keeps nanoseconds.
    stamps = np.array([r["TIMESTAMP"].replace(" ", "T") for r in rows], dtype="datetime64[ns]")
    seconds = (stamps - stamps.min()).astype(np.int64) / 1e9
    prompts = np.array([int(r["ContextTokens"]) for r in rows])
    outputs = np.array([int(r["GeneratedTokens"]) for r in rows])
    return _make(name, seconds, prompts, outputs)


def load_mooncake(path: Path | None = None) -> Workload:
    """Mooncake's synthetic trace (JSON lines: timestamp in ms, input_length, output_length)."""
    source = path if path is not None else trace_path("mooncake", "synthetic_trace.jsonl")
    with source.open() as f:
        records = [json.loads(line) for line in f if line.strip()]
    arrivals = np.array([r["timestamp"] for r in records], dtype=np.float64) / 1e3
    prompts = np.array([r["input_length"] for r in records])
    outputs = np.array([r["output_length"] for r in records])
    return _make("mooncake", arrivals, prompts, outputs)


# Column names a request log may use, first match wins: ours, the Azure trace's, Mooncake's.
_LOG_COLUMNS = {
    "timestamp": ("timestamp", "TIMESTAMP", "time", "arrival"),
    "prompt": ("prompt_tokens", "ContextTokens", "input_length", "input_tokens"),
    "output": ("output_tokens", "GeneratedTokens", "output_length"),
}


def _seconds(stamps: list[str]) -> np.ndarray:
    try:
        return np.array([float(s) for s in stamps])
    except ValueError:
        # ISO 8601; numpy keeps the seven fractional digits datetime.fromisoformat rejects.
        parsed = np.array([s.strip().replace(" ", "T").rstrip("Z") for s in stamps], dtype="datetime64[ns]")
        seconds: np.ndarray = (parsed - parsed.min()).astype(np.int64) / 1e9
        return seconds


def load_request_log(path: Path) -> Workload:
    """A request log: CSV with a header naming a timestamp (seconds, or ISO 8601), the prompt
    tokens and the output tokens (`timestamp,prompt_tokens,output_tokens`; the Azure trace's
    column names work too)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        names = {}
        for role, options in _LOG_COLUMNS.items():
            found = next((c for c in options if c in header), None)
            if found is None:
                raise ValueError(f"{path}: no {role} column (one of {', '.join(options)}) in the header")
            names[role] = found
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no requests")
    try:
        prompts = np.array([int(float(r[names["prompt"]])) for r in rows])
        outputs = np.array([int(float(r[names["output"]])) for r in rows])
    except ValueError as error:
        raise ValueError(f"{path}: token counts must be numbers ({error})") from None
    return _make(path.stem, _seconds([r[names["timestamp"]] for r in rows]), prompts, outputs)


def peak_window_rate(workload: Workload, window: float) -> float:
    """Requests/s in the busiest `window` seconds."""
    edges = np.arange(0.0, workload.duration + window, window)
    counts, _ = np.histogram(workload.arrivals, bins=edges if len(edges) > 1 else [0.0, window])
    return float(counts.max()) / window


TRACES = {"azure-conv": load_azure, "mooncake": load_mooncake}


def load_trace(name: str) -> Workload:
    """A public trace by name (`azure-conv`, `mooncake`)."""
    if name not in TRACES:
        raise KeyError(f"unknown trace {name!r}; known: {', '.join(TRACES)}")
    return TRACES[name]()


def synthetic(
    n: int, rate: float, lengths: Workload, burstiness: float = 1.0, seed: int = 0, name: str = "synthetic"
) -> Workload:
    """n requests with gamma inter-arrivals and (prompt, output) pairs resampled from `lengths`.

    `burstiness` is the coefficient of variation of the inter-arrival times: 1 is Poisson, above 1
    burstier (gamma shape 1/cv²), below 1 more regular.
    """
    if burstiness <= 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    rng = np.random.default_rng(seed)
    shape = 1.0 / burstiness**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    picks = rng.integers(0, len(lengths), size=n)
    arrivals = np.cumsum(gaps) - gaps[0]
    return Workload(name, arrivals, lengths.prompts[picks], lengths.outputs[picks])
