"""A complete minimal TrainingJob script: DDP over the whole gang, asynchronous DCP checkpoints.

Run it in the worker container either way; both form one process group across the pods:

    torchrun train.py
    torchrun --nnodes=$PET_NNODES --nproc-per-node=$PET_NPROC_PER_NODE \
             --node-rank=$PET_NODE_RANK --master-addr=$PET_MASTER_ADDR --master-port=$PET_MASTER_PORT train.py

It resumes from the latest committed checkpoint in AMPACITY_CHECKPOINT_URI (resharded if
the world size changed), checkpoints every `--checkpoint-every` steps without waiting
for the upload, and reports progress and checkpoints to the operator. Rank 0 prints one
JSON line per step.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ampacity.training.sdk import Reporter
from ampacity.training.sdk.torch_checkpoint import Checkpointer, TrainState


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of `step` on `rank`: a function of both, so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(step * 1000 + rank)
    x = torch.randn(64, 32, generator=generator)
    return x, x @ torch.linspace(-1, 1, 32).unsqueeze(1) + 0.1 * torch.randn(64, 1, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    model = DistributedDataParallel(net.to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = TrainState(model, optimizer)
    reporter = Reporter.from_env()  # None outside a TrainingJob

    def committed(result):  # called from the checkpointer's thread once a save is done
        if reporter is not None:
            reporter.report(result.step, checkpoint=result)
        if result.committed:
            print(json.dumps({"committed": result.step}), flush=True)

    # overlap_staging: the copy into host memory runs beside the next forward and backward;
    # only optimizer.step() waits for it (it is the only writer of the saved state here).
    with Checkpointer(on_complete=committed, overlap_staging=True) as checkpointer:
        resumed = checkpointer.load_latest(state)
        start = resumed.step + 1 if resumed is not None else 0
        resumed_from = resumed.step if resumed is not None else None
        print(json.dumps({"rank": rank, "pid": os.getpid(), "resumed_from": resumed_from}), flush=True)
        for step in range(start, args.steps):
            x, y = (t.to(device) for t in batch(step, rank))
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            # The mean over the gang: the same number on every rank.
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
            if rank == 0:
                print(json.dumps({"step": step, "loss": mean.item()}), flush=True)
            if step % args.checkpoint_every == 0:
                checkpointer.save(step, state)
            if reporter is not None and step % 10 == 0:
                reporter.report(step)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
