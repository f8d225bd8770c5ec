"""A user's measured latencies -> the latency model's coefficients for their model on their GPU.

A ServingPool's `latencyProfile` names a ConfigMap holding either

- CSV rows in the layout of Splitwise's `perf_model.csv`: `tensor_parallel, prompt_size,
  batch_size, token_size, prompt_time, token_time` (times in ms; other columns, such as `model`
  and `hardware`, are ignored), one row per measured configuration; or
- the JSON `vllm bench serve --save-result --save-detailed` writes (`input_lens`, `output_lens`,
  `ttfts`, `itls`, per request). Its TTFTs and inter-token latencies are end-to-end, so they
  measure one pass only when the run had no queueing: each request counts as a prefill of its
  prompt alone and `max_concurrency` (1 when unset) decodes sharing a step. The profile's TP
  degree is `tensor_parallel_size` in the JSON (1 when absent).

The fit is `latency._fit_phase`, the calibration's own (relative-error least squares with the
roofline terms as a floor), run on this profile only. One row in five is held out to measure
the error the plan reports; the coefficients used for planning are then refitted on every row.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

import numpy as np

from ampacity.serving.hardware import Calibration, GpuSpec, ModelSpec
from ampacity.serving.latency import LatencyModel, Profile, _fit_phase, profiling_artifacts, roofline_terms

_CSV_COLUMNS = ("tensor_parallel", "prompt_size", "batch_size", "token_size", "prompt_time", "token_time")
HOLD_OUT_EVERY = 5


class ProfileError(ValueError):
    """The profile cannot be read; the message names the row."""


@dataclass(frozen=True)
class ProfileFit:
    calibration: Calibration
    held_out_median_error: float
    """Median relative error on the held-out rows (prefill and decode measurements)."""
    rows: int


def _number(row: dict[str, str], column: str, line: int) -> float:
    try:
        value = float(row[column])
    except (KeyError, TypeError, ValueError):
        raise ProfileError(f"row {line}: column {column!r} is missing or not a number") from None
    if not value > 0:
        raise ProfileError(f"row {line}: column {column!r} must be positive, got {row[column]!r}")
    return value


def parse_csv(text: str, model: str, gpu: str) -> list[Profile]:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in _CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ProfileError(f"row 1 (header): missing columns {', '.join(missing)}")
    samples: dict[tuple[int, int, int, int], list[tuple[float, float]]] = {}
    for line, row in enumerate(reader, start=2):
        tp, prompt, batch, output = (int(_number(row, c, line)) for c in _CSV_COLUMNS[:4])
        times = (_number(row, "prompt_time", line) / 1e3, _number(row, "token_time", line) / 1e3)
        samples.setdefault((tp, prompt, batch, output), []).append(times)
    return [
        Profile(model, gpu, *key, float(np.mean([p for p, _ in v])), float(np.mean([d for _, d in v])))
        for key, v in sorted(samples.items())
    ]


def parse_vllm_bench(text: str, model: str, gpu: str) -> list[Profile]:
    data = json.loads(text)
    try:
        prompts, outputs = data["input_lens"], data["output_lens"]
        ttfts, itls = data["ttfts"], data["itls"]
    except (KeyError, TypeError):
        raise ProfileError(
            "the JSON has no per-request input_lens/output_lens/ttfts/itls: run vllm bench serve with "
            "--save-result --save-detailed"
        ) from None
    tp = int(data.get("tensor_parallel_size") or 1)
    batch = int(data.get("max_concurrency") or 1)
    rows = []
    for i, (prompt, output, ttft, itl) in enumerate(zip(prompts, outputs, ttfts, itls, strict=False)):
        if not (prompt and output and ttft and itl):
            continue  # a failed request (vllm records zeros and an error)
        try:
            step = float(np.mean(itl))
            rows.append(Profile(model, gpu, tp, int(prompt), batch, int(output), float(ttft), step))
        except (TypeError, ValueError):
            raise ProfileError(f"request {i}: lengths or latencies are not numbers") from None
    return rows


def parse_profile(text: str, model: str, gpu: str) -> list[Profile]:
    """Rows of a profile in either format (JSON if it starts with `{`)."""
    try:
        rows = (
            parse_vllm_bench(text, model, gpu)
            if text.lstrip().startswith("{")
            else parse_csv(text, model, gpu)
        )
    except json.JSONDecodeError as error:
        raise ProfileError(f"line {error.lineno}: not valid JSON ({error.msg})") from None
    if len(rows) < 2 * HOLD_OUT_EVERY:
        raise ProfileError(
            f"{len(rows)} measured configurations; the fit needs at least {2 * HOLD_OUT_EVERY}"
        )
    return rows


# A measured profile is the truth for its GPU: the weights are not held at the roofline's floor
# (which keeps the shared calibration safe to extrapolate), and each measured TP degree gets its
# own correction factor.
_NO_FLOOR = np.zeros(5)


def _fit(rows: list[Profile], spec: ModelSpec, hw: GpuSpec) -> Calibration:
    base = _fit_weights(rows, spec, hw)
    artifacts = profiling_artifacts(rows)
    scales = []
    for tp in sorted({p.tp for p in rows}):
        lm = LatencyModel(spec, hw, tp, base)
        prefill = [
            p.prefill_s / lm.prefill_time(p.batch * p.prompt, p.batch * p.prompt**2)
            for p in rows
            if p.tp == tp and p not in artifacts
        ]
        decode = [
            p.decode_step_s / lm.decode_time(p.batch, p.batch * (p.prompt + p.output / 2))
            for p in rows
            if p.tp == tp
        ]
        scales.append(
            (tp, float(np.median(prefill)) if prefill else 1.0, float(np.median(decode)) if decode else 1.0)
        )
    return Calibration(base.prefill, base.decode, tuple(scales))


def _fit_weights(rows: list[Profile], spec: ModelSpec, hw: GpuSpec) -> Calibration:
    artifacts = profiling_artifacts(rows)
    prefill_rows = [p for p in rows if p not in artifacts]
    prefill = np.array(
        [roofline_terms(spec, hw, p.tp, p.batch * p.prompt, p.batch * p.prompt**2, 0) for p in prefill_rows]
    )
    decode = np.array(
        [roofline_terms(spec, hw, p.tp, p.batch, 0, p.batch * (p.prompt + p.output / 2)) for p in rows]
    )
    return Calibration(
        prefill=_fit_phase(prefill, np.array([p.prefill_s for p in prefill_rows]), _NO_FLOOR),
        decode=_fit_phase(decode, np.array([p.decode_step_s for p in rows]), _NO_FLOOR),
    )


def _errors(rows: list[Profile], spec: ModelSpec, hw: GpuSpec, calibration: Calibration) -> list[float]:
    errors = []
    for p in rows:
        lm = LatencyModel(spec, hw, p.tp, calibration)
        predicted = lm.prefill_time(p.batch * p.prompt, p.batch * p.prompt**2)
        errors.append(abs(predicted - p.prefill_s) / p.prefill_s)
        predicted = lm.decode_time(p.batch, p.batch * (p.prompt + p.output / 2))
        errors.append(abs(predicted - p.decode_step_s) / p.decode_step_s)
    return errors


def fit_profile(rows: list[Profile], spec: ModelSpec, hw: GpuSpec) -> ProfileFit:
    """Coefficients for `spec` on `hw` from the user's rows, and the held-out error."""
    held_out = rows[::HOLD_OUT_EVERY]
    training = [p for i, p in enumerate(rows) if i % HOLD_OUT_EVERY]
    errors = _errors(
        [p for p in held_out if p not in profiling_artifacts(rows)], spec, hw, _fit(training, spec, hw)
    )
    return ProfileFit(_fit(rows, spec, hw), float(np.median(errors)) if errors else 0.0, len(rows))
