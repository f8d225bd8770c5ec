"""`ampacity serving engine`: the vLLM-compatible engine, with `vllm serve`'s flags where they apply.

    ampacity serving engine --role prefill --port 8001 --model meta-llama/Llama-2-70b-chat-hf \\
        --served-model-name llama2-70b --tensor-parallel-size 4 --gpu h100

`--role` is shorthand for `--kv-transfer-config` (prefill: NixlConnector as kv_producer, decode:
kv_consumer, colocated: none); the side channel reads VLLM_NIXL_SIDE_CHANNEL_HOST/PORT as vLLM does.
`--enable-sleep-mode` with VLLM_SERVER_DEV_MODE=1 serves vLLM's `/sleep`, `/wake_up`, `/is_sleeping`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import prometheus_client

from ampacity.serving import hardware, sleepmode
from ampacity.serving.engine import kv
from ampacity.serving.engine.server import ROLES, EngineConfig, serve
from ampacity.serving.simulator import Limits


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    transfer = kv.KVTransferConfig.parse(args.kv_transfer_config) if args.kv_transfer_config else None
    if args.role is not None:
        wanted = ROLES[args.role]
        if transfer is None and wanted is not None:
            transfer = kv.KVTransferConfig("NixlConnector", wanted)
        elif (transfer.role if transfer else None) not in (wanted, "kv_both"):
            raise SystemExit(f"--role {args.role} contradicts --kv-transfer-config {args.kv_transfer_config}")
    served = args.served_model_name or args.model
    latency_model = args.latency_model or served
    try:
        hardware.model(latency_model)
        hardware.gpu(args.gpu)
    except KeyError as err:
        raise SystemExit(f"{err.args[0]} (set --latency-model or --gpu)") from err
    return EngineConfig(
        model=args.model,
        served_model_name=served,
        latency_model=latency_model,
        gpu=args.gpu,
        tensor_parallel_size=args.tensor_parallel_size,
        kv_transfer=transfer,
        time_scale=args.time_scale,
        kv_bandwidth=args.kv_bandwidth,
        default_max_tokens=args.default_max_tokens,
        limits=Limits(max_batch=args.max_num_seqs, prefill_tokens=args.max_num_batched_tokens),
        side_channel_host=os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "localhost"),
        side_channel_port=int(os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", "5600")),
        request_log=args.request_log,
        max_model_len=args.max_model_len,
        enable_sleep_mode=args.enable_sleep_mode,
        dev_mode=os.environ.get(sleepmode.DEV_MODE_ENV) == "1",
    )


def normalise(args: argparse.Namespace) -> argparse.Namespace:
    """`vllm serve MODEL` takes the model positionally; accept either spelling."""
    args.model = args.model or args.model_tag
    if not args.model:
        raise SystemExit("give the model: ampacity serving engine MODEL or --model MODEL")
    return args


def _run(args: argparse.Namespace) -> int:
    args = normalise(args)
    # vLLM exports no `_created` series; neither does this engine (its own process).
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    serve(config_from_args(args), args.host, args.port, args.shutdown_timeout)
    return 0


def add_parser(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    engine = actions.add_parser(
        "engine",
        help="a vLLM-compatible engine (OpenAI API, vLLM metrics, NIXL handshake) timed by the model",
    )
    engine.add_argument("model_tag", nargs="?", help="the model, as `vllm serve MODEL` takes it")
    engine.add_argument("--model", help="the model (same as the positional argument)")
    engine.add_argument("--role", choices=sorted(ROLES), help="colocated, prefill or decode")
    engine.add_argument("--host", default="127.0.0.1")
    engine.add_argument("--port", type=int, default=8000)
    engine.add_argument("--served-model-name", help="the model name clients ask for (default: --model)")
    engine.add_argument("--latency-model", help="architecture for the latency model (default: served name)")
    engine.add_argument(
        "--gpu", default="h100", help="GPU for the latency model (h100, a100, a GFD product name)"
    )
    engine.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    engine.add_argument(
        "--kv-transfer-config",
        help="vLLM's JSON, e.g. " + json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_producer"}),
    )
    engine.add_argument(
        "--max-model-len", type=int, help="context length: longer requests get vLLM's 400 (default: none)"
    )
    engine.add_argument("--max-num-seqs", type=int, default=Limits().max_batch)
    engine.add_argument("--max-num-batched-tokens", type=int, default=Limits().prefill_tokens)
    engine.add_argument(
        "--enable-chunked-prefill",
        action="store_true",
        help="accepted as vllm serve takes it (no effect here)",
    )
    engine.add_argument(
        "--enable-sleep-mode",
        action="store_true",
        help=f"vLLM's sleep mode: /sleep, /wake_up, /is_sleeping (served with {sleepmode.DEV_MODE_ENV}=1)",
    )
    engine.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply every pass's modelled time (0.01: 100x faster)",
    )
    engine.add_argument("--kv-bandwidth", type=float, default=50e9, help="bytes/s of a KV pull (50e9)")
    engine.add_argument("--default-max-tokens", type=int, default=64, help="chat length without max_tokens")
    engine.add_argument("--request-log", type=Path, help="append one JSON line per request here")
    engine.add_argument(
        "--shutdown-timeout", type=float, default=600.0, help="seconds in-flight requests get after SIGTERM"
    )
    engine.set_defaults(func=_run)
