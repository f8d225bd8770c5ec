"""Autoscaling from per-engine scrapes, and the measured attainment, without a cluster."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from ampacity.api.servingpool import ServingPlan, ServingPoolSpec
from ampacity.serving.replan import Histogram, MetricsSnapshot
from controllers.servingpool.autoscale import EngineScrape, Scrape, next_size, observation
from controllers.servingpool.controller import measured_attainment

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "servingpool.yaml"
PLAN = ServingPlan(
    mode="disaggregated",
    prefill_tensor_parallel=2,
    prefill_replicas=3,
    decode_tensor_parallel=4,
    decode_replicas=1,
    gpus=10,
    predicted_goodput=1.1,
    predicted_attainment=0.9,
    capacity=11.0,
)
SECONDS = (0.05, 0.1, 0.5, 1.0, 2.0, float("inf"))


def spec() -> ServingPoolSpec:
    raw = yaml.safe_load(EXAMPLE.read_text())["spec"]
    raw["autoscaling"] = {"cooldown": "5m"}
    return ServingPoolSpec.model_validate(raw)


def hist(counts: tuple[float, ...]) -> Histogram:
    cumulative = [sum(counts[: i + 1]) for i in range(len(counts))]
    return Histogram(tuple(zip(SECONDS, cumulative, strict=True)), cumulative[-1], 0.0)


def snap(t: float, requests: float, **h: Histogram) -> MetricsSnapshot:
    return MetricsSnapshot(
        time=t, requests=requests, prompt_tokens=requests * 1000, output_tokens=requests * 200, **h
    )


def pool(prefill: MetricsSnapshot, decode: MetricsSnapshot) -> Scrape:
    return {"p-0": EngineScrape("prefill", prefill), "d-0": EngineScrape("decode", decode)}


def test_one_scrape_gives_no_rates_and_a_busy_pool_grows() -> None:
    now = datetime.now(UTC)
    first = pool(snap(0, 0), snap(0, 0))
    assert observation(None, first) is None
    held = next_size(spec(), PLAN, None, None, first, now)
    assert (held.prefill_replicas, held.decode_replicas) == (3, 1)
    # 40 req/s through the prefill engine (and the decode engine) over 10 s: far above 11 req/s.
    later = pool(snap(10, 400), snap(10, 400))
    grown = next_size(spec(), PLAN, held, first, later, now)
    assert grown.prefill_replicas > 3  # within maxGpus 16
    # Both phases count each request: the pool's rate counts it once.
    assert grown.observed_rate == pytest.approx(40.0)
    observed = observation(first, later)
    assert observed is not None and observed.prompt_tokens_rate == pytest.approx(40_000)


def test_measured_attainment_reads_ttft_at_prefill_and_tpot_at_decode() -> None:
    before = pool(snap(0, 0), snap(0, 0))
    # Prefill: 8 of 10 first tokens within 1 s. Decode: all 10 requests within 100 ms per token.
    after = pool(
        snap(10, 10, ttft=hist((0, 4, 2, 2, 2, 0))),
        snap(10, 10, ttft=hist((10, 0, 0, 0, 0, 0)), request_tpot=hist((5, 5, 0, 0, 0, 0))),
    )
    assert measured_attainment(spec(), before, after) == pytest.approx(0.8)
    assert measured_attainment(spec(), None, after) is None
