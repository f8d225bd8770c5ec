"""`ampacity cluster up|down|status`: the local control plane with fake GPU nodes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ampacity.dev.cluster.localcluster import DEFAULT_STATE_DIR, ClusterError, LocalCluster
from ampacity.dev.cluster.nodes import GPU_PRODUCTS, GpuNodeShape


def _progress(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


def _up(args: argparse.Namespace) -> int:
    cluster = LocalCluster(args.state_dir, progress=_progress)
    try:
        cluster.up(nodes=args.nodes, shape=GpuNodeShape(gpu_type=args.gpu_type, gpus=args.gpus_per_node))
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


def _down(args: argparse.Namespace) -> int:
    LocalCluster(args.state_dir, progress=_progress).down()
    return 0


def _status(args: argparse.Namespace) -> int:
    cluster = LocalCluster(args.state_dir)
    if not cluster.is_running():
        print("not running")
        return 1
    print(f"running at {cluster.server}\nexport KUBECONFIG={cluster.kubeconfig}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cluster = subparsers.add_parser("cluster", help="local control plane with kwok GPU nodes")
    cluster.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"where it keeps its data (default {DEFAULT_STATE_DIR})",
    )
    actions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="build (first time) and start the control plane")
    up.add_argument("--nodes", type=int, default=4, help="fake GPU nodes to register (default 4)")
    up.add_argument("--gpu-type", choices=sorted(GPU_PRODUCTS), default="h100", help="GPU model of the nodes")
    up.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    up.set_defaults(func=_up)
    actions.add_parser("down", help="stop it and delete its data").set_defaults(func=_down)
    actions.add_parser("status", help="say whether it runs").set_defaults(func=_status)
