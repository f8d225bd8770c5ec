"""One rank of the resharding test, started by torchrun: save or load a DTensor state through the SDK.

python -m torch.distributed.run --standalone --nproc-per-node=N reshard_worker.py save|load URI
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from ampacity.training.sdk.torch_checkpoint import Checkpointer

STEP = 3


def full_state() -> dict[str, torch.Tensor]:
    """The global tensors: one split evenly at 2, 4 and 8 ranks, one unevenly (10 columns)."""
    return {
        "w": torch.arange(24 * 6, dtype=torch.float32).reshape(24, 6),
        "b": torch.arange(8 * 10, dtype=torch.float32).reshape(8, 10) / 7,
        "exp_avg": torch.linspace(-3, 3, 24 * 6).reshape(24, 6),
    }


def sharded(full: dict[str, torch.Tensor], world: int) -> dict[str, object]:
    mesh = init_device_mesh("cpu", (world,))
    return {
        "model": {
            "w": distribute_tensor(full["w"], mesh, [Shard(0)]),
            "b": distribute_tensor(full["b"], mesh, [Shard(1)]),
        },
        "optimizer": {"state": {"w": {"exp_avg": distribute_tensor(full["exp_avg"], mesh, [Shard(0)])}}},
        "count": torch.tensor(7),
    }


def main() -> None:
    mode, uri, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    full = full_state()
    with Checkpointer(uri) as checkpointer:
        if mode == "save":
            checkpointer.save(STEP, sharded(full, world), extra={"data_position": 1234})
            checkpointer.wait()
            result: dict[str, object] = {"rank": dist.get_rank()}
        else:
            state = sharded({k: torch.zeros_like(v) for k, v in full.items()}, world)
            state["count"] = torch.tensor(0)
            restored = checkpointer.load_latest(state)
            assert restored is not None
            model, optimizer = state["model"], state["optimizer"]
            result = {
                "rank": dist.get_rank(),
                "step": restored.step,
                "saved_world_size": restored.saved_world_size,
                "extra": restored.extra,
                "w": model["w"].full_tensor().tolist(),  # type: ignore[index]
                "b": model["b"].full_tensor().tolist(),  # type: ignore[index]
                "exp_avg": optimizer["state"]["w"]["exp_avg"].full_tensor().tolist(),  # type: ignore[index]
                "local_w_rows": model["w"].to_local().shape[0],  # type: ignore[index]
                "count": int(state["count"]),  # type: ignore[call-overload]
            }
    # A file per rank: ranks printing lines longer than a pipe's atomic write interleave them.
    (out / f"rank-{result['rank']}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
