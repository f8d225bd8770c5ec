"""`ampacity serving bench-e2e`: the planner's pool served for real, through vllm-router and
vLLM-compatible engines on this machine, against the simulator's prediction for the same plan.

1. Plan the pool (the same planner as the operator) for the Azure conv trace and the SLOs.
2. Start its engines (`ampacity serving engine`, one process per instance, the plan's TP and roles)
   and the router (the `vllm-router` binary, P/D or plain, with the operator's router arguments).
3. Replay the first minute of the trace at each rate (arrivals stretched, lengths kept) as
   streamed completions with the trace's prompt and output lengths; TTFT is the first streamed
   token, TPOT the mean gap after it (DistServe's definitions, as the simulator uses them).
4. Simulate the same requests on the same pool (the planner's simulator, which models this request
   path: the router's round robin and its two-stage P/D protocol); compare attainment and goodput.
5. The router's added latency: short requests to one colocated engine directly and through a router.

`--time-scale` slows every engine pass down (2: half speed) so the client, router and engines keep
up on a small machine; measured latencies are divided by it before they are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import numpy as np

from ampacity.serving import hardware, planner
from ampacity.serving.eval.localpool import LocalPool, LocalProcess, engine_serve_args
from ampacity.serving.simulator import Colocated, Pool, Slo, simulate
from ampacity.serving.workload import Workload, load_azure

MODEL = "llama2-70b"
#: The router arguments the operator's Deployment carries, less discovery (see controllers/servingpool).
ROUTER_ARGS = [
    "--host",
    "0.0.0.0",
    "--port",
    "8000",
    "--prometheus-host",
    "0.0.0.0",
    "--prometheus-port",
    "29000",
]


@dataclass
class RateResult:
    rate: float
    requests: int
    measured_attainment: float
    predicted_attainment: float
    measured_goodput: float
    predicted_goodput: float
    ttft_p90: float
    tpot_p90: float
    predicted_ttft_p90: float
    predicted_tpot_p90: float
    failed: int


async def _stream(
    session: aiohttp.ClientSession, url: str, prompt: int, output: int
) -> tuple[float, float] | None:
    """(TTFT, TPOT) of one streamed completion, None if it failed."""
    body = {"model": MODEL, "prompt": [1] * prompt, "max_tokens": output, "stream": True}
    start = time.monotonic()
    first = last = None
    tokens = 0
    try:
        async with session.post(url + "/v1/completions", json=body) as reply:
            if reply.status != 200:
                return None
            async for line in reply.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                if b'"error"' in line:
                    return None
                now = time.monotonic()
                first = first if first is not None else now
                last = now
                tokens += 1
    except aiohttp.ClientError:
        return None
    if first is None or last is None or tokens != output:
        return None
    return first - start, (last - first) / (tokens - 1) if tokens > 1 else 0.0


async def replay(url: str, workload: Workload, time_scale: float) -> list[tuple[float, float] | None]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        start = time.monotonic()

        async def at(i: int) -> tuple[float, float] | None:
            delay = start + float(workload.arrivals[i]) * time_scale - time.monotonic()
            await asyncio.sleep(max(0.0, delay))
            return await _stream(session, url, int(workload.prompts[i]), int(workload.outputs[i]))

        results = await asyncio.gather(*(at(i) for i in range(len(workload))))
    return [None if r is None else (r[0] / time_scale, r[1] / time_scale) for r in results]


def _engines(pool: LocalPool, unit: Pool) -> dict[str, list[LocalProcess]]:
    if isinstance(unit, Colocated):
        args = engine_serve_args("meta-llama/Llama-2-70b-chat-hf", MODEL, unit.tp, None)
        return {"engine": [pool.engine(f"engine-{i}", args) for i in range(unit.instances)]}
    prefill = engine_serve_args("meta-llama/Llama-2-70b-chat-hf", MODEL, unit.prefill_tp, "prefill")
    decode = engine_serve_args("meta-llama/Llama-2-70b-chat-hf", MODEL, unit.decode_tp, "decode")
    bandwidth = ["--kv-bandwidth", str(unit.kv_bandwidth)]
    return {
        "prefill": [pool.engine(f"prefill-{i}", prefill + bandwidth) for i in range(unit.prefill_instances)],
        "decode": [pool.engine(f"decode-{i}", decode + bandwidth) for i in range(unit.decode_instances)],
    }


def _router(pool: LocalPool, engines: dict[str, list[LocalProcess]], policy: str) -> LocalProcess:
    args = [*ROUTER_ARGS, "--policy", policy]
    if "engine" in engines:
        return pool.router(args, workers=[e.url for e in engines["engine"]])
    return pool.router(
        [*args, "--vllm-pd-disaggregation"],
        prefill=[e.url for e in engines["prefill"]],
        decode=[e.url for e in engines["decode"]],
    )


def describe(unit: Pool) -> str:
    if isinstance(unit, Colocated):
        return f"{unit.instances} x TP{unit.tp} colocated"
    prefill = f"{unit.prefill_instances} x TP{unit.prefill_tp} prefill"
    return f"{prefill} + {unit.decode_instances} x TP{unit.decode_tp} decode"


def run_rate(url: str, unit: Pool, minute: Workload, rate: float, slo: Slo, time_scale: float) -> RateResult:
    workload = minute.at_rate(rate)
    measured = asyncio.run(replay(url, workload, time_scale))
    ok = [m for m in measured if m is not None]
    meets = [m is not None and m[0] <= slo.ttft and m[1] <= slo.tpot for m in measured]
    sim = simulate(unit, workload, hardware.model(MODEL), hardware.gpu("h100"))
    duration = workload.duration or 1.0
    ttft = np.array([m[0] for m in ok]) if ok else np.array([np.nan])
    tpot = np.array([m[1] for m in ok]) if ok else np.array([np.nan])
    return RateResult(
        rate=rate,
        requests=len(workload),
        measured_attainment=float(np.mean(meets)),
        predicted_attainment=sim.attainment(slo),
        measured_goodput=float(np.sum(meets)) / duration,
        predicted_goodput=float(np.sum(sim.meets(slo))) / duration,
        ttft_p90=float(np.percentile(ttft, 90)),
        tpot_p90=float(np.percentile(tpot, 90)),
        predicted_ttft_p90=float(np.percentile(sim.ttft, 90)),
        predicted_tpot_p90=float(np.percentile(sim.tpot, 90)),
        failed=len(measured) - len(ok),
    )


async def _paired_latencies(direct: str, routed: str, n: int) -> tuple[list[float], list[float]]:
    """One-token completions alternating between the engine and the router, so both see the same
    machine load."""
    body = {"model": MODEL, "prompt": [1] * 8, "max_tokens": 1}
    times: dict[str, list[float]] = {direct: [], routed: []}
    async with aiohttp.ClientSession() as session:
        for i in range(n + 20):
            for url in (direct, routed) if i % 2 else (routed, direct):
                start = time.monotonic()
                async with session.post(url + "/v1/completions", json=body) as reply:
                    await reply.read()
                if i >= 20:  # the first requests warm the connections
                    times[url].append(time.monotonic() - start)
    return times[direct], times[routed]


def router_overhead(workdir: Path, n: int) -> dict[str, float]:
    """Latency of one-token completions on one idle engine, directly and through the router."""
    with LocalPool(workdir, time_scale=1.0) as pool:
        engine = pool.engine("overhead-engine", engine_serve_args("m", MODEL, 4, None))
        router = pool.router([*ROUTER_ARGS, "--policy", "round_robin"], workers=[engine.url])
        direct_list, routed_list = asyncio.run(_paired_latencies(engine.url, router.url, n))
    direct, routed = np.array(direct_list), np.array(routed_list)
    return {
        "direct_p50_ms": float(np.percentile(direct, 50) * 1e3),
        "direct_p99_ms": float(np.percentile(direct, 99) * 1e3),
        "router_p50_ms": float(np.percentile(routed, 50) * 1e3),
        "router_p99_ms": float(np.percentile(routed, 99) * 1e3),
        "added_p50_ms": float((np.percentile(routed, 50) - np.percentile(direct, 50)) * 1e3),
        "added_p99_ms": float((np.percentile(routed, 99) - np.percentile(direct, 99)) * 1e3),
    }


def bench(args: argparse.Namespace) -> int:
    trace = load_azure()
    minute = trace.head(int(np.searchsorted(trace.arrivals, 60.0)))
    slo = Slo(args.ttft, args.tpot)
    print(
        f"planning {MODEL} on h100 for azure-conv, TTFT {slo.ttft:g}s TPOT {slo.tpot * 1e3:g}ms",
        file=sys.stderr,
    )
    plans = planner.plan(
        hardware.model(MODEL), planner.Cluster(hardware.gpu("h100")), slo, trace.thin(600), 0.9
    )
    unit = (plans.colocated if args.mode == "colocated" else plans.disaggregated) if args.mode else plans.best
    assert unit is not None, "no pool meets the SLOs"
    rates = args.rates or [round(unit.goodput * f, 2) for f in (0.4, 0.7, 1.0)]
    print(f"plan: {describe(unit.pool)}, {unit.goodput:.2f} req/s at {unit.attainment:.0%}", file=sys.stderr)
    results: list[RateResult] = []
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-e2e-"))
    with LocalPool(workdir, time_scale=args.time_scale) as pool:
        engines = _engines(pool, unit.pool)
        router = _router(pool, engines, args.policy)
        for rate in rates:
            print(f"replaying {len(minute)} requests at {rate:g} req/s ...", file=sys.stderr, flush=True)
            results.append(run_rate(router.url, unit.pool, minute, rate, slo, args.time_scale))
            r = results[-1]
            print(
                f"  measured {r.measured_attainment:.1%} (goodput {r.measured_goodput:.2f} req/s), "
                f"predicted {r.predicted_attainment:.1%} ({r.predicted_goodput:.2f}); failed {r.failed}",
                file=sys.stderr,
            )
    print("router overhead ...", file=sys.stderr, flush=True)
    overhead = router_overhead(workdir, args.overhead_requests)
    report = {
        "plan": describe(unit.pool),
        "gpus": unit.gpus,
        "planned_goodput": unit.goodput,
        "slo": asdict(slo),
        "time_scale": args.time_scale,
        "rates": [asdict(r) for r in results],
        "router_overhead": overhead,
    }
    print(format_report(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def format_report(report: dict[str, object]) -> str:
    lines = [
        f"plan: {report['plan']} ({report['gpus']} GPUs), "
        f"planned goodput {report['planned_goodput']:.2f} req/s",
        "| rate (req/s) | requests | measured attainment | predicted |"
        " measured goodput | predicted goodput | TTFT p90 meas./pred. | TPOT p90 meas./pred. | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rates"]:  # type: ignore[attr-defined]
        lines.append(
            f"| {r['rate']:g} | {r['requests']} | "
            f"{r['measured_attainment']:.1%} | {r['predicted_attainment']:.1%} | "
            f"{r['measured_goodput']:.2f} | {r['predicted_goodput']:.2f} | "
            f"{r['ttft_p90'] * 1e3:.0f} / {r['predicted_ttft_p90'] * 1e3:.0f} ms | "
            f"{r['tpot_p90'] * 1e3:.1f} / {r['predicted_tpot_p90'] * 1e3:.1f} ms | {r['failed']} |"
        )
    o = report["router_overhead"]
    lines.append(
        f"one-token completions, direct: p50 {o['direct_p50_ms']:.2f} ms, p99 {o['direct_p99_ms']:.2f} ms; "  # type: ignore[index]
        f"through the router: p50 {o['router_p50_ms']:.2f} ms, p99 {o['router_p99_ms']:.2f} ms "  # type: ignore[index]
        f"(added: p50 {o['added_p50_ms']:.2f} ms, p99 {o['added_p99_ms']:.2f} ms)"  # type: ignore[index]
    )
    return "\n".join(lines)


def add_parser(
    actions: argparse._SubParsersAction[argparse.ArgumentParser], parse_duration: Callable[[str], float]
) -> None:
    parser = actions.add_parser(
        "bench-e2e",
        help="replay a minute of the Azure conv trace through vllm-router + engines vs the simulator",
    )
    parser.add_argument("--ttft", type=parse_duration, default=1.0, help="TTFT SLO (1s)")
    parser.add_argument("--tpot", type=parse_duration, default=0.1, help="TPOT SLO (100ms)")
    parser.add_argument("--mode", choices=["colocated", "disaggregated"], help="default: the planner's best")
    parser.add_argument(
        "--rates", type=float, nargs="+", help="req/s (default: 0.4, 0.7, 1.0 x planned goodput)"
    )
    parser.add_argument(
        "--time-scale", type=float, default=4.0, help="slow the engines down (4: quarter speed)"
    )
    parser.add_argument(
        "--policy",
        default="round_robin",
        help="router policy (round_robin, the ServingPool default and the one the prediction models)",
    )
    parser.add_argument("--overhead-requests", type=int, default=300)
    parser.add_argument("--workdir", type=Path, help="logs of the engines and the router")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.set_defaults(func=bench)
