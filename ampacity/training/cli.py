"""`ampacity training ...`: the checkpoint-interval policy, the waste simulation and the stall benchmark."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ampacity.training.checkpoint_interval import FailureRatePrior, auto_interval
from ampacity.training.eval.bench import bench_checkpoint_stall
from ampacity.training.eval.simulation import JobConfig, compare_policies
from ampacity.training.failure_trace import load_failure_trace

if TYPE_CHECKING:
    from ampacity.training.eval.torch_bench import PersistBenchmark


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("training", help="TrainingJob checkpoint policy, simulation, benchmark")
    commands = parser.add_subparsers(dest="training_command", required=True, metavar="COMMAND")

    def job_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--nodes", type=int, default=JobConfig.nodes, help="nodes in the gang")
        p.add_argument("--stall", type=float, default=JobConfig.stall_seconds, help="save stall, s")
        p.add_argument("--persist", type=float, default=JobConfig.persist_seconds, help="persist time, s")

    sim = commands.add_parser("sim", help="GPU-time wasted by auto vs fixed vs the Daly oracle on the trace")
    job_options(sim)
    sim.add_argument("--gpus-per-node", type=int, default=JobConfig.gpus_per_node)
    sim.add_argument("--restart", type=float, default=JobConfig.restart_seconds, help="restart time, s")
    sim.add_argument("--fixed-interval", type=float, default=3600.0, help="the fixed policy, s")
    sim.add_argument("--trials", type=int, default=20, help="random placements of the job")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--prior-until-days", type=float, default=100.0, help="prior from days before this; the rest replayed"
    )
    sim.add_argument("--prior-weight", type=float, default=2.0, help="prior strength in pseudo-failures")
    sim.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sim.set_defaults(func=_sim)

    interval = commands.add_parser("interval", help="the auto interval and its reason for given measurements")
    job_options(interval)
    interval.add_argument("--restarts", type=int, default=0, help="restarts observed so far")
    interval.add_argument("--exposure-node-hours", type=float, default=0.0, help="node-hours run so far")
    interval.add_argument("--prior-weight", type=float, default=2.0)
    interval.set_defaults(func=_interval)

    bench = commands.add_parser("bench-checkpoint", help="save stall: async two-phase vs synchronous save")
    bench.add_argument("--size-gb", type=float, default=2.0, help="state size (GiB)")
    bench.add_argument("--arrays", type=int, default=16, help="number of arrays the state is split into")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=_bench)

    torch_bench = commands.add_parser(
        "bench-torch-checkpoint",
        help="PyTorch: DCP async save stall vs torch.save; persist to disk and to a local S3 server",
    )
    torch_bench.add_argument("--size-gb", type=float, default=1.0, help="state size for the stall (GiB)")
    torch_bench.add_argument("--tensors", type=int, default=16)
    torch_bench.add_argument("--repeats", type=int, default=5)
    torch_bench.add_argument(
        "--persist-size-gb", type=float, default=0.5, help="state size for persist (GiB)"
    )
    torch_bench.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    torch_bench.set_defaults(func=_bench_torch)


def _sim(args: argparse.Namespace) -> int:
    job = JobConfig(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        stall_seconds=args.stall,
        persist_seconds=args.persist,
        restart_seconds=args.restart,
    )
    result = compare_policies(
        load_failure_trace(),
        job,
        seed=args.seed,
        trials=args.trials,
        prior_until_days=args.prior_until_days,
        prior_weight=args.prior_weight,
        fixed_interval_seconds=args.fixed_interval,
    )
    rows = {
        name: {
            "wasted_gpu_hours": p.wasted_gpu_hours,
            "checkpoint_gpu_hours": p.waste.checkpoint_seconds * p.gpus / 3600,
            "lost_work_gpu_hours": p.waste.lost_seconds * p.gpus / 3600,
            "restart_gpu_hours": p.waste.restart_seconds * p.gpus / 3600,
            "waste_fraction": p.waste.total_seconds / (result.trials * result.horizon_hours * 3600),
            "checkpoints": p.waste.checkpoints,
            "failures": p.waste.failures,
            "ratio_to_oracle": result.ratio_to_oracle(name),
        }
        for name, p in result.policies.items()
    }
    if args.json:
        print(json.dumps({"job": asdict(job), "trials": result.trials, "policies": rows}, indent=2))
        return 0
    print(
        f"{job.nodes} nodes x {job.gpus_per_node} GPUs, {result.trials} placements x "
        f"{result.horizon_hours:.0f} h replayed; MTBF {result.true_mtbf_hours:.1f} h in the replay, "
        f"{result.prior_mtbf_hours:.1f} h from the prior"
    )
    row_format = "{:8} {:>13} {:>10} {:>10} {:>10} {:>8} {:>8}"
    print(row_format.format("policy", "wasted GPU-h", "ckpt", "lost", "restart", "waste %", "/oracle"))
    for name, row in rows.items():
        print(
            row_format.format(
                name,
                f"{row['wasted_gpu_hours']:.0f}",
                f"{row['checkpoint_gpu_hours']:.0f}",
                f"{row['lost_work_gpu_hours']:.0f}",
                f"{row['restart_gpu_hours']:.0f}",
                f"{100 * row['waste_fraction']:.2f}",
                f"{row['ratio_to_oracle']:.3f}",
            )
        )
    return 0


def _interval(args: argparse.Namespace) -> int:
    prior = FailureRatePrior.from_trace(load_failure_trace(), weight=args.prior_weight, source="InfiniteHBD")
    decision = auto_interval(
        stall_seconds=args.stall,
        persist_seconds=args.persist,
        nodes=args.nodes,
        prior=prior,
        observed_failures=args.restarts,
        exposure_node_hours=args.exposure_node_hours,
    )
    print(f"{decision.interval_seconds:.0f} s")
    print(decision.reason)
    return 0


def _bench(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="ampacity-ckpt-bench-", dir=args.dir) as tmp:
        result = bench_checkpoint_stall(
            Path(tmp), size_gb=args.size_gb, arrays=args.arrays, repeats=args.repeats
        )
    if args.json:
        print(json.dumps({**asdict(result), "ratio": result.ratio}, indent=2))
        return 0
    gib = result.size_bytes / 2**30
    print(f"state {gib:.2f} GiB in {result.arrays} arrays, {len(result.sync_stall_seconds)} saves each")
    print(_series("sync stall s:    ", result.sync_stall_seconds))
    print(_series("async stall s:   ", result.async_stall_seconds))
    print(_series("async persist s: ", result.async_persist_seconds))
    print(
        f"median sync stall {result.sync_median:.3f} s, "
        f"median async stall {result.async_median:.3f} s: {result.ratio:.1f}x lower"
    )
    return 0


def _series(label: str, seconds: list[float]) -> str:
    """One benchmark line: the label, then each measurement in seconds."""
    return label + " ".join(f"{s:.3f}" for s in seconds)


def _bench_torch(args: argparse.Namespace) -> int:
    # torch, and moto (a dev dependency) for the local S3 server, only for this command.
    from ampacity.training.eval.torch_bench import bench_persist, bench_torch_stall, bench_training_loop_stall

    with tempfile.TemporaryDirectory(prefix="ampacity-torch-bench-", dir=args.dir) as tmp:
        stall = bench_torch_stall(Path(tmp), size_gb=args.size_gb, tensors=args.tensors, repeats=args.repeats)
        print(
            f"state {stall.size_bytes / 2**30:.2f} GiB in {stall.tensors} tensors, {args.repeats} saves each"
        )
        print(_series("torch.save + fsync s: ", stall.sync_stall_seconds))
        print(_series("DCP async stall s:    ", stall.async_stall_seconds))
        print(_series("DCP async persist s:  ", stall.async_persist_seconds))
        print(f"median stall ratio: {stall.ratio:.1f}x lower")
        loop = bench_training_loop_stall(Path(tmp), size_gb=args.size_gb, repeats=args.repeats)
        size = loop.size_bytes / 2**30
        print(f"training loop: state {size:.2f} GiB (weights + Adam), {args.repeats} saves each")
        print(_series("torch.save + fsync s:     ", loop.sync_stall_seconds))
        print(_series("overlapped DCP stall s:   ", loop.overlapped_stall_seconds))
        print(_series("step beside the copy s:   ", loop.overlapped_step_seconds))
        print(
            f"median stall ratio: {loop.ratio:.1f}x lower; the step beside the copy took "
            f"{loop.step_slowdown_seconds:+.3f} s vs a plain step"
        )
        disk = bench_persist(f"file://{tmp}/persist", {}, size_gb=args.persist_size_gb)
    s3 = _bench_local_s3(args.persist_size_gb)
    for result in (disk, s3):
        print(
            f"persist to {result.uri.split(':')[0]}: {result.bytes_per_second / 2**20:.0f} MiB/s "
            f"(median of {' '.join(f'{t:.2f}' for t in result.persist_seconds)} s for "
            f"{result.size_bytes / 2**20:.0f} MiB)"
        )
    return 0


def _bench_local_s3(size_gb: float) -> PersistBenchmark:
    """Persist to moto's S3 server in a process of its own on 127.0.0.1 (as a store is another host)."""
    import socket
    import subprocess
    import sys
    import time

    import boto3  # type: ignore[import-untyped]

    from ampacity.training.eval.torch_bench import bench_persist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.setdefault(key, "bench")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        client = boto3.client("s3", endpoint_url=endpoint)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        return bench_persist("s3://bench/persist", {"endpoint_url": endpoint}, size_gb=size_gb)
    finally:
        server.terminate()
        server.wait(timeout=30)
