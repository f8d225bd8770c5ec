"""The distributed environment of one worker pod, as torchrun and `init_process_group` read it.

A worker pod gets both conventions, so that any way of starting PyTorch forms one group
across the gang:

- the `PET_*` variables Kubeflow Trainer's torch runtime sets (pkg/runtime/framework/
  plugins/torch/torch.go): torchrun reads each of its options from `PET_<OPTION>` when the
  flag is absent (torch/distributed/argparse_util.py `env`), so a bare `torchrun train.py`
  runs `PET_NPROC_PER_NODE` processes per pod, `PET_NNODES` pods, this pod as node
  `PET_NODE_RANK`, with the static rendezvous on `PET_MASTER_ADDR:PET_MASTER_PORT`
  (the store is hosted by node 0's agent). `torchrun --nnodes=$(PET_NNODES) ...` reads
  the same values explicitly.
- `WORLD_SIZE` / `RANK` / `MASTER_ADDR` / `MASTER_PORT` for a script that calls
  `torch.distributed.init_process_group("env://")` itself, one process per pod. torchrun
  overwrites these for the processes it starts, so the two never conflict.

Pure: the controller writes it into the pod, and the tests start local processes with it.
"""

from __future__ import annotations

#: The port of the rendezvous store on worker 0 (torchrun's and PyTorch's default).
RENDEZVOUS_PORT = 29500


def worker_name(job: str, rank: int) -> str:
    return f"{job}-worker-{rank}"


def master_address(job: str) -> str:
    """Worker 0's DNS name through the job's headless Service (pod hostname.subdomain)."""
    return f"{worker_name(job, 0)}.{job}"


def rendezvous_env(
    *,
    rank: int,
    world_size: int,
    gpus_per_worker: int,
    master_addr: str,
    master_port: int = RENDEZVOUS_PORT,
) -> dict[str, str]:
    """The variables worker `rank` of a `world_size`-pod gang needs to join the group.

    One process per GPU; a CPU-only worker (no GPUs) runs one process.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if gpus_per_worker < 0:
        raise ValueError(f"gpus_per_worker must be >= 0, not {gpus_per_worker}")
    return {
        "PET_NNODES": str(world_size),
        "PET_NPROC_PER_NODE": str(max(1, gpus_per_worker)),
        "PET_NODE_RANK": str(rank),
        "PET_MASTER_ADDR": master_addr,
        "PET_MASTER_PORT": str(master_port),
        "WORLD_SIZE": str(world_size),
        "RANK": str(rank),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }
