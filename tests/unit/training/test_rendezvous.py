"""The worker environment against what torchrun's own argument parser makes of it."""

from __future__ import annotations

import pytest
from torch.distributed import run

from ampacity.training.rendezvous import master_address, rendezvous_env


def test_every_pod_names_the_whole_gang_and_its_own_node_rank() -> None:
    envs = [
        rendezvous_env(rank=r, world_size=3, gpus_per_worker=8, master_addr=master_address("llm"))
        for r in range(3)
    ]
    assert {e["PET_NNODES"] for e in envs} == {"3"}
    assert {e["PET_NPROC_PER_NODE"] for e in envs} == {"8"}
    assert [e["PET_NODE_RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["PET_MASTER_ADDR"] for e in envs} == {"llm-worker-0.llm"}
    assert {(e["WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {
        ("3", "llm-worker-0.llm", "29500")
    }
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]


def test_a_cpu_worker_runs_one_process() -> None:
    assert (
        rendezvous_env(rank=0, world_size=1, gpus_per_worker=0, master_addr="m")["PET_NPROC_PER_NODE"] == "1"
    )
    with pytest.raises(ValueError, match="outside world size"):
        rendezvous_env(rank=2, world_size=2, gpus_per_worker=1, master_addr="m")


def test_a_bare_torchrun_reads_the_gang_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's parser (torch/distributed/run.py) with no flags, as `torchrun train.py` runs it."""
    env = rendezvous_env(
        rank=1, world_size=4, gpus_per_worker=8, master_addr="llm-worker-0.llm", master_port=29511
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = run.parse_args(["train.py"])
    config, _, _ = run.config_from_args(args)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (4, 4, 8)
    assert args.rdzv_backend == "static"
    assert config.rdzv_configs["rank"] == 1
    assert config.rdzv_endpoint == "llm-worker-0.llm:29511"
