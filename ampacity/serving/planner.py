"""The ServingPool planner: DistServe's goodput-maximising search over disaggregated pools.

Goodput (Zhong et al., "DistServe", OSDI 2024) is the highest request rate at which at least 90%
of requests meet both the TTFT and the TPOT SLO; plans are compared per GPU. The search follows
DistServe's: size each phase alone (the best TP for a prefill instance under the TTFT SLO, for a
decode instance under the TPOT SLO), combine them in the prefill:decode ratio that balances the two
phases' rates, then check the few best combinations end to end in the simulator. When KV caches
must stay inside a node (slow inter-node network), a prefill:decode unit must fit in one node and
transfers use NVLink; otherwise they cross the node's NIC. Colocated pools are searched too, for
comparison and because they win when the TPOT SLO is loose.

Inputs and outputs are plain frozen dataclasses so the ServingPool reconciler can call `plan` and
`replicas_for_rate` directly.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np

from ampacity.serving.hardware import GpuSpec, ModelSpec
from ampacity.serving.latency import LatencyModel
from ampacity.serving.simulator import (
    Colocated,
    Disaggregated,
    GiveUp,
    Limits,
    Pool,
    SimResult,
    Slo,
    simulate,
    simulate_unless,
)
from ampacity.serving.workload import Workload

TARGET_ATTAINMENT = 0.9
TP_DEGREES = (1, 2, 4, 8)
# Rates are searched on one geometric grid (2^(k/8) req/s, ~9% apart) for every pool and SLO, so
# goodputs are compared on the same rates and a search is reproducible.
_GRID_STEPS_PER_DOUBLING = 8
# End-to-end checks of the best phase combinations (DistServe simulates its top candidates too),
# per placement: the phase-alone estimate cannot see KV transfer time, which decides between a
# unit inside one node (NVLink) and one across nodes (the NIC) when prompts are long. Four, not
# two: on Azure conv at a 50 ms TPOT the phase-alone score ranks 2xTP2 + 1xTP4 third (0.595
# req/s per GPU end to end, against 0.5 for the best-scored two).
_VERIFIED_PER_PLACEMENT = 4
_MAX_INSTANCES_PER_PHASE = 8
# Colocated pools are also searched with chunked prefill (Sarathi-Serve): the strongest colocated
# baseline when the TPOT SLO is tight, since no pass then stalls decodes for a whole prompt.
COLOCATED_CHUNKS = (0, 512)
# A prefill:decode unit spans at most this many nodes; the pool scales by whole units or, through
# `replicas_for_rate`, phase by phase.
_MAX_UNIT_NODES = 2

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Cluster:
    gpu: GpuSpec
    gpus_per_node: int = 8
    node_bandwidth: float = 50e9
    """Bytes/s of a node's network interface (50e9: 400 Gb/s)."""
    kv_in_node: bool = False
    """Keep every KV transfer on NVLink: prefill and decode instances that exchange KV share a node."""


@dataclass(frozen=True)
class PoolPlan:
    """A pool and the rate it sustains within the SLOs."""

    pool: Pool
    goodput: float
    """Requests/s the whole pool serves with the target SLO attainment."""
    attainment: float
    """Attainment measured at that rate."""

    @property
    def gpus(self) -> int:
        return self.pool.gpus

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput / self.gpus


@dataclass(frozen=True)
class Plan:
    disaggregated: PoolPlan | None
    colocated: PoolPlan | None
    candidates: tuple[PoolPlan, ...] = ()
    """Every pool checked end to end, best or not (the alternatives a preview shows)."""

    @property
    def best(self) -> PoolPlan:
        # On a tie the colocated pool wins: one kind of instance, no KV transfers to run.
        plans = [p for p in (self.colocated, self.disaggregated) if p is not None]
        if not plans:
            raise ValueError("no pool can serve this workload on this hardware")
        return max(plans, key=lambda p: p.goodput_per_gpu)


def _rate(k: int) -> float:
    return float(2.0 ** (k / _GRID_STEPS_PER_DOUBLING))


def steady_attainment(result: SimResult, slo: Slo) -> float:
    """SLO attainment of the middle half of the requests, in arrival order.

    The first requests find an empty pool and the last ones a draining one; counting them would
    flatter large pools at high rates, whose sample spans only a few request lifetimes.
    """
    n = len(result.ttft)
    middle = slice(n // 4, n - n // 4)
    return float(np.mean(result.meets(slo)[middle])) if n else 1.0


def goodput(
    pool: Pool,
    workload: Workload,
    spec: ModelSpec,
    hw: GpuSpec,
    slo: Slo,
    target: float = TARGET_ATTAINMENT,
    limits: Limits | None = None,
    guess: float | None = None,
) -> tuple[float, float]:
    """(highest grid rate with attainment >= target, the attainment there); (0, 0) if none.

    The workload is replayed at each rate by stretching its time axis. Attainment falls with rate
    in practice, so an exponential search from `guess` (req/s; any positive value gives the same
    answer, a close one fewer simulations) brackets the answer and bisection on the grid ends it.

    A rate also has to be sustainable: when the last request arrives, at most the share of
    requests the target lets miss (10%) may still be queued for their last phase. Without that
    check a finite sample hides an ever-growing queue, because a long wait amortised over hundreds
    of output tokens still passes the TPOT SLO; past the pool's capacity by a factor f, a share
    1 - 1/f of the requests is still queued at the end, whatever the sample size.
    """
    cache: dict[int, float] = {}

    n = len(workload)
    # The middle half steady_attainment counts, and the misses the target allows there.
    give_up = GiveUp(slo, n // 4, n - n // 4, math.floor((1 - target) * (n - 2 * (n // 4)) + 1e-9))

    def attainment(k: int) -> float:
        if k not in cache:
            stretched = workload.at_rate(_rate(k))
            result = simulate_unless(pool, stretched, spec, hw, limits, give_up)
            if result is None:
                cache[k] = 0.0
            else:
                backlog = float(np.mean(result.admitted > stretched.duration))
                cache[k] = steady_attainment(result, slo) if backlog <= 1 - target else 0.0
        return cache[k]

    # Gallop from the guess (1 req/s without one) until the target is bracketed, within 1/1024
    # to 4096 req/s, then bisect on the grid. A guess near the answer brackets it in two or three
    # simulations instead of the six or more that doubling from 1 req/s takes.
    lowest, highest = -10 * _GRID_STEPS_PER_DOUBLING, 12 * _GRID_STEPS_PER_DOUBLING
    start = 0 if guess is None or guess <= 0 else round(math.log2(guess) * _GRID_STEPS_PER_DOUBLING)
    start = min(max(start, lowest), highest)
    step = 2 if guess is not None else _GRID_STEPS_PER_DOUBLING
    if attainment(start) >= target:
        good = start
        while good < highest and attainment(min(good + step, highest)) >= target:
            good = min(good + step, highest)
            step *= 2
        if good >= highest:
            return _rate(good), attainment(good)
        bad = min(good + step, highest)
    else:
        bad = start
        while True:
            if bad <= lowest:
                return 0.0, 0.0
            candidate = max(bad - step, lowest)
            if attainment(candidate) >= target:
                good = candidate
                break
            bad = candidate
            step *= 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if attainment(mid) >= target:
            good = mid
        else:
            bad = mid
    return _rate(good), attainment(good)


def attainment_curve(
    pool: Pool, workload: Workload, spec: ModelSpec, hw: GpuSpec, slo: Slo, rates: Iterable[float]
) -> np.ndarray:
    """SLO attainment of `pool` at each rate (for plots)."""
    return np.array([steady_attainment(simulate(pool, workload.at_rate(r), spec, hw), slo) for r in rates])


def _prefill_guess(lm: LatencyModel, workload: Workload) -> float:
    """Requests/s one prefill instance clears with prompts one at a time: a start for the search."""
    return 1.0 / float(np.mean([lm.prefill_time(p, p * p) for p in workload.prompts.tolist()]))


def _decode_guess(lm: LatencyModel, workload: Workload, tpot: float) -> float:
    """Requests/s one decode instance sustains at the largest batch whose step meets `tpot`."""
    context = float(np.mean(workload.prompts + workload.outputs / 2))
    fits = lm.kv_capacity_tokens() / float(np.mean(workload.prompts + workload.outputs))
    most = max(1, min(Limits().max_batch, int(fits)))
    batch = next((b for b in range(most, 0, -1) if lm.decode_time(b, b * context) <= tpot), 1)
    return batch / (float(np.mean(workload.outputs)) * lm.decode_time(batch, batch * context))


def _feasible_tps(spec: ModelSpec, cluster: Cluster, tokens: int) -> list[int]:
    return [
        tp
        for tp in TP_DEGREES
        if tp <= cluster.gpus_per_node and LatencyModel(spec, cluster.gpu, tp).kv_capacity_tokens() >= tokens
    ]


def _kv_bandwidth(cluster: Cluster, prefill_tp: int, decode_tp: int, in_node: bool) -> float:
    if in_node:
        # Each GPU sends its TP shard over its own NVLink; the narrower side limits.
        return min(prefill_tp, decode_tp) * cluster.gpu.nvlink_bandwidth
    # Across nodes a prefill instance gets its GPUs' share of the node's NIC.
    return cluster.node_bandwidth * prefill_tp / cluster.gpus_per_node


def _shortlist(cluster: Cluster, prefill: dict[int, float], decode: dict[int, float]) -> list[Disaggregated]:
    """The pools worth simulating end to end.

    `prefill` and `decode` map a TP degree to one instance's goodput in that phase alone; every
    (TP, instance count) combination is scored by the rate its slower phase sustains per GPU, and
    the best few of each placement (inside a node, across nodes) are kept.
    """
    scored: dict[bool, list[tuple[float, int, Disaggregated]]] = {True: [], False: []}
    for tp_p, g_p in prefill.items():
        for tp_d, g_d in decode.items():
            for n_p in range(1, _MAX_INSTANCES_PER_PHASE + 1):
                for n_d in range(1, _MAX_INSTANCES_PER_PHASE + 1):
                    gpus = n_p * tp_p + n_d * tp_d
                    if gpus > _MAX_UNIT_NODES * cluster.gpus_per_node:
                        continue
                    in_node = gpus <= cluster.gpus_per_node
                    if cluster.kv_in_node and not in_node:
                        continue
                    pool = Disaggregated(tp_p, n_p, tp_d, n_d, _kv_bandwidth(cluster, tp_p, tp_d, in_node))
                    scored[in_node].append((min(n_p * g_p, n_d * g_d) / gpus, gpus, pool))
    picks = []
    for placement in scored.values():
        # Ties (the same per-GPU rate from a multiple of a smaller unit) go to the smaller pool.
        placement.sort(key=lambda c: (-c[0], c[1]))
        picks += [pool for _, _, pool in placement[:_VERIFIED_PER_PLACEMENT]]
    return picks


def plan(
    spec: ModelSpec,
    cluster: Cluster,
    slo: Slo,
    workload: Workload,
    target: float = TARGET_ATTAINMENT,
    progress: Progress | None = None,
    longest: tuple[int, int] | None = None,
) -> Plan:
    """The best disaggregated and colocated pools for serving `workload` within `slo`.

    `longest` is (prompt, prompt + output) tokens of the longest request the pool must admit,
    which a sample of the workload may not contain: only TP degrees whose KV cache holds it are
    searched, so the plan also serves the whole trace (or the user's longest request).
    """
    note = progress if progress is not None else (lambda _: None)
    hw = cluster.gpu
    largest_prompt = max(int(workload.prompts.max()), longest[0] if longest else 0)
    largest = max(int((workload.prompts + workload.outputs).max()), longest[1] if longest else 0)
    unbounded = math.inf

    guesses: dict[int, tuple[float, float]] = {}
    for tp in _feasible_tps(spec, cluster, largest_prompt):
        lm = LatencyModel(spec, hw, tp)
        guesses[tp] = (_prefill_guess(lm, workload), _decode_guess(lm, workload, slo.tpot))

    prefill: dict[int, float] = {}
    for tp in _feasible_tps(spec, cluster, largest_prompt):
        note(f"prefill TP{tp}")
        alone = Disaggregated(tp, 1, tp, 0, unbounded)
        rate, _ = goodput(alone, workload, spec, hw, Slo(slo.ttft, unbounded), target, guess=guesses[tp][0])
        if rate > 0:
            prefill[tp] = rate
    decode: dict[int, float] = {}
    for tp in _feasible_tps(spec, cluster, largest):
        note(f"decode TP{tp}")
        alone = Disaggregated(tp, 0, tp, 1, unbounded)
        rate, _ = goodput(alone, workload, spec, hw, Slo(unbounded, slo.tpot), target, guess=guesses[tp][1])
        if rate > 0:
            decode[tp] = rate
    disaggregated = []
    for pool in _shortlist(cluster, prefill, decode):
        note(
            f"pool {pool.prefill_instances}xTP{pool.prefill_tp} + {pool.decode_instances}xTP{pool.decode_tp}"
        )
        # The slower phase's rate alone bounds the pool's: start the search there.
        bound = min(
            prefill[pool.prefill_tp] * pool.prefill_instances, decode[pool.decode_tp] * pool.decode_instances
        )
        disaggregated.append(PoolPlan(pool, *goodput(pool, workload, spec, hw, slo, target, guess=bound)))

    colocated = []
    for tp, chunk in (
        (tp, chunk) for tp in _feasible_tps(spec, cluster, largest) for chunk in COLOCATED_CHUNKS
    ):
        note(f"colocated TP{tp}" + (f" chunked {chunk}" if chunk else ""))
        # A node's worth of instances, so both kinds of pool get similar statistical multiplexing.
        pool_c = Colocated(tp, max(1, cluster.gpus_per_node // tp), chunk)
        # Prefill and decode share each instance's time: rates add as harmonic parts.
        p_rate, d_rate = prefill.get(tp, guesses[tp][0]), decode.get(tp, guesses[tp][1])
        guess = pool_c.instances / (1 / p_rate + 1 / d_rate)
        colocated.append(PoolPlan(pool_c, *goodput(pool_c, workload, spec, hw, slo, target, guess=guess)))
    return Plan(
        disaggregated=_best(disaggregated),
        colocated=_best(colocated),
        candidates=(*disaggregated, *colocated),
    )


_MEMO: OrderedDict[tuple[object, ...], Plan] = OrderedDict()
_MEMO_SIZE = 256


def forget_plans() -> None:
    """Empty the memo (benchmarks time planning from scratch)."""
    _MEMO.clear()


def plan_once(
    spec: ModelSpec,
    cluster: Cluster,
    slo: Slo,
    workload: Workload,
    target: float = TARGET_ATTAINMENT,
    longest: tuple[int, int] | None = None,
) -> Plan:
    """`plan`, computed once per distinct input in this process (a bounded LRU memo).

    `plan` is a pure function of its inputs, and an operator holding hundreds of pools sees the
    same (model, GPU, SLO, workload) many times over: every pool after the first of a kind, and
    every pool again after a restart of its watch, costs a dictionary lookup.
    """
    digest = hashlib.sha1()
    for array in (workload.arrivals, workload.prompts, workload.outputs):
        digest.update(np.ascontiguousarray(array).tobytes())
    key = (spec, cluster, slo, target, longest, digest.hexdigest())
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    result = plan(spec, cluster, slo, workload, target, longest=longest)
    _MEMO[key] = result
    if len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return result


def _best(plans: list[PoolPlan]) -> PoolPlan | None:
    """The highest goodput per GPU; the first (smallest TP, or best-scored) wins ties."""
    serving = [p for p in plans if p.goodput > 0]
    return max(serving, key=lambda p: p.goodput_per_gpu) if serving else None


def replicas_for_rate(planned: PoolPlan, rate: float) -> Pool:
    """The planned pool scaled (instances per phase, at the planned TP and ratio) to serve `rate` req/s.

    Each phase's instance count grows in proportion to rate / goodput, rounded up: per-instance
    load then stays at or below what the plan was checked at.
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    factor = rate / planned.goodput
    pool = planned.pool
    if isinstance(pool, Colocated):
        return replace(pool, instances=max(1, math.ceil(pool.instances * factor - 1e-9)))
    return replace(
        pool,
        prefill_instances=max(1, math.ceil(pool.prefill_instances * factor - 1e-9)),
        decode_instances=max(1, math.ceil(pool.decode_instances * factor - 1e-9)),
    )
