"""`python -m agents`: the node agent (a DaemonSet process per GPU node).

    python -m agents --node gpu-node-0                      # NVML (needs nvidia-ml-py and a GPU)
    python -m agents --node gpu-node-0 --simulate --load-file load.json --kubeconfig agent.kubeconfig
    python -m agents --node gpu-node-0 --operator-url http://ampacity-operator.ampacity-system.svc:8083

The node name defaults to $NODE_NAME (the DaemonSet sets it from spec.nodeName). Simulated
H100s are used only when asked for (`--simulate` or AMPACITY_AGENT_SIMULATE=1: the demo and
tests). Otherwise the agent uses NVML; if NVML cannot be opened it keeps running, caps
nothing, and says so in its NodePower status and metrics (it fails closed). With
`--operator-url` (the chart sets it) samples and assignments go through the operator's power
telemetry endpoint, not etcd (`agents.operator_link`); without it, or while it cannot be reached,
through the NodePower on the API server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from agents.agent import Agent, LoadFile
from agents.gpu import GpuBackend, NvmlBackend, SimulatedGpuBackend
from agents.metrics import AgentMetrics
from agents.operator_link import OperatorLink
from agents.pod_resources import KUBELET_SOCKET, PodResourcesClient
from ampacity.kube import Kube

log = logging.getLogger("ampacity.agent")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="python -m agents", description="Ampacity node power agent.")
    p.add_argument("--node", default=env.get("NODE_NAME", ""), help="node name (default $NODE_NAME)")
    p.add_argument(
        "--interval", type=float, default=float(env.get("AMPACITY_AGENT_INTERVAL", "1")), help="seconds"
    )
    p.add_argument(
        "--metrics-port", type=int, default=int(env.get("AMPACITY_AGENT_METRICS_PORT", "9400")), help="0: off"
    )
    p.add_argument("--metrics-address", default=env.get("AMPACITY_AGENT_METRICS_ADDRESS", "0.0.0.0"))
    p.add_argument("--kubeconfig", default=env.get("AMPACITY_AGENT_KUBECONFIG") or None)
    p.add_argument(
        "--simulate",
        action="store_true",
        default=env.get("AMPACITY_AGENT_SIMULATE") == "1",
        help="simulated GPUs instead of NVML",
    )
    p.add_argument("--gpus", type=int, default=8, help="simulated GPUs")
    p.add_argument("--load-file", type=Path, default=None, help="JSON load for the simulated GPUs")
    p.add_argument(
        "--pod-resources-socket",
        default=env.get("AMPACITY_AGENT_POD_RESOURCES_SOCKET", KUBELET_SOCKET),
        help="kubelet pod-resources socket for the GPU-to-pod map ('' to disable)",
    )
    p.add_argument(
        "--operator-url",
        default=env.get("AMPACITY_AGENT_OPERATOR_URL", ""),
        help="the operator's power telemetry endpoint ('' : NodePower on the API server only)",
    )
    p.add_argument(
        "--operator-ca-file",
        type=Path,
        default=env.get("AMPACITY_AGENT_OPERATOR_CA_FILE") or None,
        help="the operator CA's certificate, to verify an https:// --operator-url with",
    )
    p.add_argument(
        "--request-timeout", type=float, default=3.0, help="API request timeout (s): past it, fail-safe"
    )
    args = p.parse_args(argv)
    if not args.node:
        p.error("--node or $NODE_NAME is required")
    return args


async def main_async(args: argparse.Namespace) -> None:
    backend: GpuBackend | None = None
    load: LoadFile | None = None
    if args.simulate:
        simulated = SimulatedGpuBackend(args.gpus)
        load = LoadFile(args.load_file, simulated) if args.load_file else None
        backend = simulated
    metrics = AgentMetrics(args.node)
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    kube = Kube(kubeconfig=args.kubeconfig, timeout=args.request_timeout)
    pods = PodResourcesClient(args.pod_resources_socket) if args.pod_resources_socket else None
    link = None
    if args.operator_url:
        link = OperatorLink(
            args.operator_url, args.node, timeout=args.request_timeout, ca_file=args.operator_ca_file
        )
    agent = Agent(
        args.node,
        backend,
        kube,
        metrics,
        before_round=load.refresh if load else None,
        pod_resources=pods,
        open_backend=NvmlBackend,
        link=link,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    log.info(
        "agent for %s (%s), every %.2fs", args.node, "simulated" if args.simulate else "nvml", args.interval
    )
    try:
        await agent.run(args.interval, stop)
    finally:
        agent.close()
        if pods is not None:
            await pods.close()
        if link is not None:
            await link.close()
        await kube.close()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(main_async(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
