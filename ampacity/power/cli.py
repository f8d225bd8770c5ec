"""`ampacity power ...`: the oversubscription evaluation and the GPU model's calibration."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ampacity.power.budget import Actuator
from ampacity.power.calibration import load_zeus_points, zeus_cap_curve
from ampacity.power.eval.plot import plot_row_power
from ampacity.power.eval.simulation import (
    Comparison,
    Criteria,
    RowConfig,
    compare,
    fit_servers,
    row_budget,
)
from ampacity.power.gpu_model import H100_SXM

# One row of 16 servers provisioned at nameplate: 16 x 8 x 700 W (H100 SXM max limit).
_DEFAULT_LIMIT_KW = 16 * 8 * H100_SXM.max_limit_watts / 1000


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    power = subparsers.add_parser("power", help="power oversubscription: simulation and GPU model")
    commands = power.add_subparsers(dest="power_command", required=True, metavar="SUBCOMMAND")

    sim = commands.add_parser("sim", help="simulate one row under a PowerBudget, with and without caps")
    sim.add_argument(
        "--servers", type=int, nargs="+", default=[18], help="servers in the row; several counts make a sweep"
    )
    _row_arguments(sim)
    sim.set_defaults(func=_run_sim)

    fit = commands.add_parser(
        "fit", help="how many servers fit: nameplate, measured peak, and with the policy"
    )
    _row_arguments(fit)
    fit.add_argument("--max-p99-increase", type=float, default=0.05, help="allowed p99 latency/TTFT increase")
    fit.add_argument("--max-training-loss", type=float, default=0.10, help="allowed training throughput loss")
    fit.set_defaults(func=_run_fit)

    curve = commands.add_parser("curve", help="print the Zeus-fitted cap-to-throughput curve and its error")
    curve.set_defaults(func=_run_curve)

    bench = commands.add_parser(
        "bench-reaction",
        help="time from a surge above T2 to caps assigned, on a local control plane with kwok nodes",
    )
    bench.add_argument("--nodes", type=int, default=100, help="kwok GPU nodes (8 GPUs each)")
    bench.add_argument("--trials", type=int, default=5)
    bench.add_argument("--concurrency", type=int, default=32, help="status writes in flight at once")
    bench.add_argument("--steady-seconds", type=float, default=60.0, help="steady state measured per trial")
    bench.add_argument("--surge-seconds", type=float, default=10.0, help="seconds sampled after the surge")
    bench.set_defaults(func=_run_bench_reaction)


def _row_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit-kw", type=float, default=_DEFAULT_LIMIT_KW, help="budget limit (breaker) in kW")
    p.add_argument(
        "--training-fraction", type=float, default=0.25, help="share of servers training (low priority)"
    )
    p.add_argument("--duration", type=float, default=1800.0, help="simulated seconds (after a 60 s warm-up)")
    p.add_argument(
        "--load-scale", type=float, default=0.5, help="Azure conv arrival-rate multiplier per server"
    )
    p.add_argument("--t1", type=float, default=0.85, help="T1 as a fraction of the limit")
    p.add_argument("--t2", type=float, default=0.95, help="T2 as a fraction of the limit")
    p.add_argument("--hold", type=float, default=30.0, help="seconds below a threshold before caps loosen")
    p.add_argument("--training-min-cap", type=float, default=350.0, help="min cap for training GPUs (W)")
    p.add_argument("--inference-min-cap", type=float, default=500.0, help="min cap for inference GPUs (W)")
    p.add_argument("--telemetry-interval", type=float, default=2.0, help="seconds between policy rounds")
    p.add_argument(
        "--actuation-delay", type=float, default=2.0, help="seconds from a round to caps in effect"
    )
    p.add_argument(
        "--actuator",
        choices=[a.value for a in Actuator],
        default=Actuator.POWER_LIMIT.value,
        help="PowerLimit: watt caps alone; ClockLock: SM clock locks first, watt caps as backstop",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out"), help="folder for the plot and JSON summary")


def _config(args: argparse.Namespace, servers: int) -> RowConfig:
    budget = row_budget(
        args.limit_kw * 1000,
        training_min_cap_watts=args.training_min_cap,
        inference_min_cap_watts=args.inference_min_cap,
        t1_fraction=args.t1,
        t2_fraction=args.t2,
        actuator=Actuator(args.actuator),
    )
    return RowConfig(
        budget=replace(budget, hold_seconds=args.hold),
        servers=servers,
        training_fraction=args.training_fraction,
        duration_s=args.duration,
        telemetry_interval_s=args.telemetry_interval,
        actuation_delay_s=args.actuation_delay,
        load_scale=args.load_scale,
        seed=args.seed,
    )


def _summary(c: Comparison) -> dict[str, Any]:
    count, seconds = c.capped.overruns
    limit = c.capped.config.budget.limit_watts
    return {
        "servers": c.capped.config.servers,
        "actuator": c.capped.config.budget.actuator.value,
        "limit_kw": limit / 1000,
        "peak_kw_with_policy": c.capped.peak_watts / 1000,
        "peak_kw_uncapped": c.uncapped.peak_watts / 1000,
        "mean_kw_with_policy": float(c.capped.row_watts.mean()) / 1000,
        "mean_kw_uncapped": float(c.uncapped.row_watts.mean()) / 1000,
        "overruns": count,
        "overrun_seconds": seconds,
        "p99_latency_s": float(np.percentile(c.capped.latency_s, 99)) if c.capped.latency_s.size else None,
        "p99_latency_s_uncapped": float(np.percentile(c.uncapped.latency_s, 99))
        if c.uncapped.latency_s.size
        else None,
        "p99_latency_increase": c.p99_latency_increase,
        "p99_ttft_s": float(np.percentile(c.capped.ttft_s, 99)) if c.capped.ttft_s.size else None,
        "p99_ttft_s_uncapped": float(np.percentile(c.uncapped.ttft_s, 99))
        if c.uncapped.ttft_s.size
        else None,
        "p99_ttft_increase": c.p99_ttft_increase,
        "training_throughput_loss": c.training_throughput_loss,
        "threshold_events": c.capped.threshold_events,
        "cap_changes": c.capped.cap_changes,
    }


def _print_summary(s: dict[str, Any]) -> None:
    print(
        f"{s['servers']} servers under {s['limit_kw']:.1f} kW: "
        f"peak {s['peak_kw_with_policy']:.1f} kW with the policy ({s['peak_kw_uncapped']:.1f} kW uncapped), "
        f"{s['overruns']} overruns / {s['overrun_seconds']:.1f} s above the limit"
    )
    print(
        f"  high priority: p99 latency {s['p99_latency_increase']:+.1%}, "
        f"p99 TTFT {s['p99_ttft_increase']:+.1%}; "
        f"training throughput lost {s['training_throughput_loss']:.1%}; "
        f"{s['threshold_events']} threshold entries, {s['cap_changes']} GPU cap changes"
    )


def _write_json(out: Path, name: str, summary: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / f'{name}.json'}")


def _write_plot(out: Path, name: str, comparison: Comparison) -> None:
    print(f"wrote {plot_row_power(comparison, out / f'{name}.png')}")


def _run_sim(args: argparse.Namespace) -> int:
    summaries = []
    for servers in args.servers:
        comparison = compare(_config(args, servers))
        summaries.append(_summary(comparison))
        _print_summary(summaries[-1])
        _write_plot(args.out, f"power_sim_{servers}", comparison)
    _write_json(args.out, "power_sim", summaries)
    return 0


def _run_fit(args: argparse.Namespace) -> int:
    criteria = Criteria(args.max_p99_increase, args.max_training_loss)
    result = fit_servers(_config(args, 1), criteria)
    gain = result.policy_servers / result.nameplate_servers - 1
    print(
        f"servers that fit under {args.limit_kw:.1f} kW: {result.nameplate_servers} at nameplate, "
        f"{result.peak_servers} at the measured uncapped peak, "
        f"{result.policy_servers} with the policy ({gain:+.0%})"
    )
    print("  tried (servers, accepted): " + ", ".join(f"({n}, {ok})" for n, ok in result.tried))
    summary: dict[str, Any] = {
        "nameplate_servers": result.nameplate_servers,
        "peak_servers": result.peak_servers,
        "policy_servers": result.policy_servers,
        "tried": [list(t) for t in result.tried],
        "at_policy_servers": _summary(result.best),
    }
    _print_summary(summary["at_policy_servers"])
    _write_json(args.out, "power_fit", summary)
    _write_plot(args.out, "power_fit", result.best)
    return 0


def _run_curve(args: argparse.Namespace) -> int:
    curve = zeus_cap_curve()
    points = load_zeus_points()
    x = np.array([p.cap_fraction for p in points])
    y = np.array([p.throughput_fraction for p in points])
    residual = np.abs(curve(x) - y)
    print("cap / uncapped draw -> throughput fraction (Zeus V100 + A40, median per bin, monotone):")
    for kx, ky in zip(curve.knots_x, curve.knots_y, strict=True):
        print(f"  {kx:5.3f} -> {ky:5.3f}")
    print(
        f"{len(points)} points: median |error| {np.median(residual):.3f}, "
        f"p90 {np.percentile(residual, 90):.3f} (job-to-job spread, not fit bias)"
    )
    return 0


def _run_bench_reaction(args: argparse.Namespace) -> int:
    from ampacity.dev.power_bench import bench_reaction, summarize

    trials = bench_reaction(
        args.nodes,
        args.trials,
        args.concurrency,
        steady_seconds=args.steady_seconds,
        surge_seconds=args.surge_seconds,
    )
    print(summarize(trials, args.nodes))
    return 0
