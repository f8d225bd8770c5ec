"""Prefill and decode iteration latency: a roofline calibrated on the Splitwise profiles.

Every iteration's time is a non-negative combination of five roofline terms, per GPU:

- compute: (2·params·tokens + attention FLOPs) / (TP · peak FLOP/s); dominates prefill;
- memory:  (weights + KV bytes read) / (TP · HBM bandwidth); dominates decode;
- all-reduce bytes: two all-reduces of the activations per layer over NVLink (ring: 2(TP-1)/TP);
- all-reduce count: 2·layers launches when TP > 1 (latency-bound collectives);
- layers: a per-layer overhead (kernel launches, norms, the framework's Python), which extrapolates
  to models of other depths better than a per-iteration constant would.

The weights of those terms (efficiency and overheads) are fitted separately for prefill and decode
iterations on each GPU type by least squares on relative error against the measured
`splitwise/perf_model.csv` (Patel et al., "Splitwise", ISCA 2024; llama2-70b and bloom-176b on A100
and H100, TP 2/4/8), with the compute and memory weights held at >= 1 so the roofline stays a
hard lower bound (an unconstrained fit reaches lower error on these rows by trading bandwidth for
a large constant, which then extrapolates badly to small models and TP 1). The fit is
`fit_calibration`; its result is pinned in `CALIBRATION` so the operator needs no trace files at
run time, and a unit test refits and checks the pin.

All terms are linear in the token counts, so a `LatencyModel` reduces to three numbers per phase
and the simulator's inner loop stays cheap.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ampacity.data import trace_path
from ampacity.serving.hardware import Calibration, GpuSpec, ModelSpec, PhaseCoefficients, gpu, model

# GPUs in perf_model.csv that map to ours. The `h100-80gb-pcap` rows (power-capped H100, a Splitwise
# power study) are a different operating point of the same part and are left out.
PROFILE_GPUS = {"a100-80gb": "a100", "h100-80gb": "h100"}

# The models perf_model.csv measures: any other model's latencies are its architecture's roofline
# under the calibrated efficiencies.
PROFILED_MODELS = frozenset({"llama2-70b", "bloom-176b"})

# vLLM's default `gpu_memory_utilization`: the share of HBM that weights plus KV cache may take.
MEMORY_UTILIZATION = 0.9


# Output of `fit_calibration(load_profiles())`; `tests/unit/serving/test_latency.py` refits and
# fails if these drift from the data.
CALIBRATION: dict[str, Calibration] = {
    "a100": Calibration(
        prefill=PhaseCoefficients(compute=1.280, memory=1.0, comm=5.659, sync=3.852e-05, layer=0.0),
        decode=PhaseCoefficients(compute=1.0, memory=1.0, comm=17.63, sync=0.0, layer=3.699e-04),
    ),
    "h100": Calibration(
        prefill=PhaseCoefficients(compute=1.358, memory=1.0, comm=4.794, sync=5.732e-05, layer=0.0),
        decode=PhaseCoefficients(compute=1.0, memory=1.0, comm=24.48, sync=1.328e-04, layer=0.0),
    ),
}


def roofline_terms(
    spec: ModelSpec, hw: GpuSpec, tp: int, tokens: float, prompt_sq: float, context: float
) -> np.ndarray:
    """The five uncalibrated terms (seconds, or a count for `sync` and `layer`) of one forward pass.

    `tokens` are the tokens computed in the pass, `prompt_sq` the sum of squared prompt lengths
    (causal attention over a prompt of n tokens costs ~2·layers·hidden·n² FLOPs), and `context`
    the KV-cache tokens that decoding sequences attend to (each read once per step).
    """
    width = spec.attention_width
    flops = 2 * spec.compute_params * tokens + 2 * spec.layers * width * prompt_sq
    flops += 4 * spec.layers * width * context
    compute = flops / (tp * hw.peak_flops)
    # A mixture of experts reads the experts its tokens use (the active parameters) per pass.
    weights_read = spec.compute_params * spec.bytes_per_value
    memory = (weights_read + spec.kv_bytes_per_token * context) / (tp * hw.hbm_bandwidth)
    activation_bytes = tokens * spec.hidden * spec.bytes_per_value
    comm = 2 * spec.layers * activation_bytes * 2 * (tp - 1) / tp / hw.nvlink_bandwidth
    sync = 2 * spec.layers if tp > 1 else 0
    return np.array([compute, memory, comm, sync, spec.layers])


class LatencyModel:
    """Iteration latency of one model instance (`tp` GPUs of one type), in seconds."""

    def __init__(self, spec: ModelSpec, hw: GpuSpec, tp: int, calibration: Calibration | None = None) -> None:
        if tp < 1:
            raise ValueError(f"tensor-parallel degree must be >= 1, got {tp}")
        self.spec, self.hw, self.tp = spec, hw, tp
        cal = calibration or hw.calibration or CALIBRATION[hw.calibration_key]
        # Each phase is affine in (tokens, prompt_sq, context): evaluate the terms at unit inputs once.
        prefill_scale, decode_scale = cal.scale(tp)
        self._prefill = self._affine(cal.prefill, prefill_scale)
        self._decode = self._affine(cal.decode, decode_scale)
        self._kv_read = decode_scale * cal.decode.memory * spec.kv_bytes_per_token / (tp * hw.hbm_bandwidth)

    def _affine(self, coefficients: PhaseCoefficients, scale: float) -> tuple[float, float, float, float]:
        w = coefficients.as_array() * scale
        base = float(w @ roofline_terms(self.spec, self.hw, self.tp, 0, 0, 0))
        # Weights read once per iteration, launches and collectives: the cost of any iteration.
        per_token = float(w @ roofline_terms(self.spec, self.hw, self.tp, 1, 0, 0)) - base
        per_sq = float(w @ roofline_terms(self.spec, self.hw, self.tp, 0, 1, 0)) - base
        per_context = float(w @ roofline_terms(self.spec, self.hw, self.tp, 0, 0, 1)) - base
        return base, per_token, per_sq, per_context

    def prefill_time(self, tokens: float, prompt_sq: float) -> float:
        """A prefill iteration over prompts totalling `tokens` (sum of squares `prompt_sq`)."""
        base, per_token, per_sq, _ = self._prefill
        return base + per_token * tokens + per_sq * prompt_sq

    def decode_time(self, batch: float, context: float) -> float:
        """One decode step for `batch` sequences holding `context` KV tokens in all."""
        base, per_token, _, per_context = self._decode
        return base + per_token * batch + per_context * context

    def decode_coefficients(self) -> tuple[float, float, float]:
        """(base, per sequence, per context token): `decode_time` is their affine combination."""
        base, per_token, _, per_context = self._decode
        return base, per_token, per_context

    def mixed_time(self, prefill_tokens: float, prompt_sq: float, batch: float, context: float) -> float:
        """A vLLM-style mixed iteration: new prompts and running decodes in one forward pass.

        With prompts in it the pass is compute-bound, so it costs a prefill over all its tokens
        (the decodes' one token each included) plus the decodes' KV-cache reads; that surcharge
        on the decodes is the prefill-decode interference disaggregation removes.
        """
        if prefill_tokens <= 0:
            return self.decode_time(batch, context)
        return self.prefill_time(prefill_tokens + batch, prompt_sq) + self._kv_read * context

    def kv_capacity_tokens(self) -> int:
        """KV-cache tokens the instance holds once the weights are loaded (0: the model does not fit)."""
        free = self.tp * self.hw.memory_bytes * MEMORY_UTILIZATION - self.spec.weight_bytes
        return max(0, int(free // self.spec.kv_bytes_per_token))

    def kv_transfer_bytes(self, prompt_tokens: int) -> int:
        return prompt_tokens * self.spec.kv_bytes_per_token


@dataclass(frozen=True)
class Profile:
    """One measured configuration of perf_model.csv, averaged over its repetitions."""

    model: str
    gpu: str
    tp: int
    prompt: int
    batch: int
    output: int
    prefill_s: float
    decode_step_s: float


def load_profiles(path: Path | None = None) -> list[Profile]:
    """The Splitwise profiles for the GPUs we model, repetitions averaged."""
    source = path if path is not None else trace_path("splitwise", "perf_model.csv")
    samples: dict[tuple[str, str, int, int, int, int], list[tuple[float, float]]] = defaultdict(list)
    with source.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["hardware"] not in PROFILE_GPUS:
                continue
            key = (
                row["model"],
                PROFILE_GPUS[row["hardware"]],
                int(row["tensor_parallel"]),
                int(row["prompt_size"]),
                int(row["batch_size"]),
                int(row["token_size"]),
            )
            # The CSV is in milliseconds.
            samples[key].append((float(row["prompt_time"]) / 1e3, float(row["token_time"]) / 1e3))
    return [
        Profile(
            *key, prefill_s=float(np.mean([p for p, _ in v])), decode_step_s=float(np.mean([d for _, d in v]))
        )
        for key, v in sorted(samples.items())
    ]


def profiling_artifacts(profiles: list[Profile]) -> set[Profile]:
    """Rows whose prefill is faster than the same prompts at half the batch.

    Physically impossible (the work doubled); in perf_model.csv these are the TP2 batch-64 rows,
    where 32k prompt tokens did not fit next to the weights and the profiler measured something
    else. They are kept out of the fit and the reported error.
    """
    by_key = {(p.model, p.gpu, p.tp, p.prompt, p.batch, p.output): p for p in profiles}
    bad = set()
    for p in profiles:
        half = by_key.get((p.model, p.gpu, p.tp, p.prompt, p.batch // 2, p.output))
        if p.batch > 1 and half is not None and p.prefill_s < half.prefill_s:
            bad.add(p)
    return bad


def _prefill_terms(p: Profile) -> np.ndarray:
    return roofline_terms(model(p.model), gpu(p.gpu), p.tp, p.batch * p.prompt, p.batch * p.prompt**2, 0)


def _decode_terms(p: Profile) -> np.ndarray:
    # `token_time` is the mean step over the whole generation: context averages prompt + output/2.
    return roofline_terms(model(p.model), gpu(p.gpu), p.tp, p.batch, 0, p.batch * (p.prompt + p.output / 2))


def nnls(a: np.ndarray, b: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """min ||a·x - b|| subject to x >= 0 (Lawson and Hanson's active-set algorithm)."""
    n = a.shape[1]
    passive = np.zeros(n, dtype=bool)
    x = np.zeros(n)
    for _ in range(3 * n):
        gradient = a.T @ (b - a @ x)
        candidates = np.where(~passive & (gradient > tol))[0]
        if candidates.size == 0:
            break
        passive[candidates[np.argmax(gradient[candidates])]] = True
        while True:
            trial = np.zeros(n)
            trial[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if trial[passive].min() > tol:
                break
            # Step back towards x until the first passive weight hits zero, then drop it.
            shrinking = passive & (trial <= tol)
            alpha = np.min(x[shrinking] / (x[shrinking] - trial[shrinking]))
            x = x + alpha * (trial - x)
            passive &= x > tol
        x = trial
    return x


# Lower bounds of the weights: no kernel beats peak FLOP/s or HBM bandwidth; overheads are >= 0.
_FLOOR = np.array([1.0, 1.0, 0.0, 0.0, 0.0])


def _fit_phase(terms: np.ndarray, measured: np.ndarray, floor: np.ndarray = _FLOOR) -> PhaseCoefficients:
    # Relative error: divide each row by its measurement. Columns are scaled to unit norm first
    # because the terms span ten orders of magnitude (a count of all-reduces next to seconds).
    a = terms / measured[:, None]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    above_floor = nnls(a / scale, np.ones(len(measured)) - a @ floor) / scale
    return PhaseCoefficients(*(float(v) for v in floor + above_floor))


def fit_calibration(profiles: list[Profile]) -> dict[str, Calibration]:
    """Fit prefill and decode coefficients per GPU type."""
    artifacts = profiling_artifacts(profiles)
    result = {}
    for name in sorted({p.gpu for p in profiles}):
        rows = [p for p in profiles if p.gpu == name]
        prefill_rows = [p for p in rows if p not in artifacts]
        prefill = _fit_phase(
            np.array([_prefill_terms(p) for p in prefill_rows]), np.array([p.prefill_s for p in prefill_rows])
        )
        decode = _fit_phase(
            np.array([_decode_terms(p) for p in rows]), np.array([p.decode_step_s for p in rows])
        )
        result[name] = Calibration(prefill=prefill, decode=decode)
    return result


def relative_errors(profiles: list[Profile], calibration: dict[str, Calibration] | None = None) -> np.ndarray:
    """|predicted - measured| / measured for every prefill and decode measurement (artifacts excluded)."""
    cal = calibration if calibration is not None else CALIBRATION
    artifacts = profiling_artifacts(profiles)
    errors = []
    for p in profiles:
        lm = LatencyModel(model(p.model), gpu(p.gpu), p.tp, cal[p.gpu])
        if p not in artifacts:
            predicted = lm.prefill_time(p.batch * p.prompt, p.batch * p.prompt**2)
            errors.append(abs(predicted - p.prefill_s) / p.prefill_s)
        predicted = lm.decode_time(p.batch, p.batch * (p.prompt + p.output / 2))
        errors.append(abs(predicted - p.decode_step_s) / p.decode_step_s)
    return np.array(errors)
