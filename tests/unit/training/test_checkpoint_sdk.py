import itertools
import threading
from pathlib import Path

import numpy as np
import pytest

from ampacity.training.retention import RetentionPolicy
from ampacity.training.sdk import (
    AsyncCheckpointer,
    SaveResult,
    ShardSpec,
    TornCheckpointError,
    apply_retention,
    even_shard,
    latest_complete,
    list_checkpoints,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    shard_array,
)
from ampacity.training.sdk.layout import MANIFEST, step_dir

# Full (global) parameters, and the axis each is split along (None: replicated).
rng = np.random.default_rng(42)
FULL: dict[str, np.ndarray] = {
    "embed.weight": rng.standard_normal((37, 8)).astype(np.float32),
    "mlp.w1": rng.standard_normal((6, 29)).astype(np.float16),
    "ids": np.arange(23, dtype=np.int64),
    "norm.bias": rng.standard_normal(8).astype(np.float64),
}
AXES: dict[str, int | None] = {"embed.weight": 0, "mlp.w1": 1, "ids": 0, "norm.bias": None}


def rank_state(world_size: int, rank: int) -> tuple[dict[str, np.ndarray], dict[str, ShardSpec]]:
    """What one rank of a `world_size` job holds: its shards and the replicated parameters."""
    state, shards = {}, {}
    for name, full in FULL.items():
        axis = AXES[name]
        if axis is None:
            state[name] = full
        else:
            state[name], shards[name] = shard_array(full, world_size, rank, axis)
    return state, shards


def save_sharded(root: Path, step: int, world_size: int) -> list[SaveResult]:
    """Every rank of a `world_size` job saves its shard, as the ranks of a real job would."""
    results = []
    for rank in range(world_size):
        state, shards = rank_state(world_size, rank)
        results.append(
            save_checkpoint(
                root, step, state, rank=rank, world_size=world_size, shards=shards, extra={"seen": step}
            )
        )
    return results


@pytest.mark.parametrize(("saved", "loaded"), [(1, 3), (2, 3), (3, 2), (4, 1), (4, 4), (3, 5), (5, 2)])
def test_reshard_round_trip_is_exact(tmp_path: Path, saved: int, loaded: int) -> None:
    results = save_sharded(tmp_path, 10, saved)
    assert [r.committed for r in results] == [False] * (saved - 1) + [True]
    assert read_manifest(results[0].path).world_size == saved
    parts = [load_checkpoint(tmp_path, rank=r, world_size=loaded) for r in range(loaded)]
    assert {p.step for p in parts} == {10} and parts[0].extra == {"seen": 10}
    for name, full in FULL.items():
        axis = AXES[name]
        for rank, part in enumerate(parts):
            assert part.state[name].dtype == full.dtype
            if axis is not None:
                assert part.state[name].shape == even_shard(full.shape, loaded, rank, axis).shape
        if axis is None:
            assert all(np.array_equal(p.state[name], full) for p in parts)
        else:
            assert np.array_equal(np.concatenate([p.state[name] for p in parts], axis=axis), full)


def test_explicit_target_region(tmp_path: Path) -> None:
    save_sharded(tmp_path, 1, 3)
    spec = even_shard((37, 8), 2, 1, axis=1)  # a split the checkpoint never had
    loaded = load_checkpoint(tmp_path, shards={"embed.weight": spec})
    assert np.array_equal(loaded.state["embed.weight"], FULL["embed.weight"][:, 4:])


def test_torn_checkpoint_is_ignored(tmp_path: Path) -> None:
    save_sharded(tmp_path, 100, 2)
    # A crash during step 200: rank 0 finished its fragments and index, rank 1 never did,
    # so no manifest was committed.
    state0, shards0 = rank_state(2, 0)
    torn = save_checkpoint(tmp_path, 200, state0, rank=0, world_size=2, shards=shards0)
    assert not torn.committed and not (torn.path / MANIFEST).exists()
    # A crash between writing the temporary manifest and renaming it.
    (torn.path / f".{MANIFEST}.123.tmp").write_text("{")
    assert [(c.step, c.complete) for c in list_checkpoints(tmp_path)] == [(100, True), (200, False)]
    assert latest_complete(tmp_path) == step_dir(tmp_path, 100)
    assert load_checkpoint(tmp_path).step == 100
    with pytest.raises(TornCheckpointError):
        load_checkpoint(torn.path)


def test_lost_fragment_makes_a_checkpoint_incomplete(tmp_path: Path) -> None:
    save_sharded(tmp_path, 1, 1)
    results = save_sharded(tmp_path, 2, 1)
    fragment = next((results[0].path / "params").rglob("*.npy"))
    fragment.write_bytes(fragment.read_bytes()[:-8])  # truncated by a failing disk
    assert latest_complete(tmp_path) == step_dir(tmp_path, 1)


def test_no_checkpoint_at_all(tmp_path: Path) -> None:
    assert latest_complete(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)


def test_async_save_snapshots_before_training_moves_on(tmp_path: Path) -> None:
    completed: list[SaveResult] = []
    done = threading.Event()

    def on_complete(result: SaveResult) -> None:
        completed.append(result)
        done.set()

    state: dict[str, np.ndarray] = {"w": np.arange(1000, dtype=np.float32), "b": np.ones(3)}
    with AsyncCheckpointer(tmp_path, on_complete=on_complete) as checkpointer:
        checkpointer.reserve(state)
        stall = checkpointer.save(5, state, extra={"lr": 0.1})
        state["w"] += 1.0  # the next training step, while the persist may still be running
        assert done.wait(timeout=10)
        stall2 = checkpointer.save(6, state)
        result = checkpointer.wait()
    assert stall >= 0 and stall2 >= 0
    assert result is not None and result.step == 6 and result.committed
    assert completed[0].step == 5 and completed[0].committed and completed[0].size_bytes > 4000
    five = load_checkpoint(step_dir(tmp_path, 5))
    assert np.array_equal(five.state["w"], np.arange(1000, dtype=np.float32))
    assert five.extra == {"lr": 0.1}
    assert np.array_equal(load_checkpoint(tmp_path).state["w"], np.arange(1000, dtype=np.float32) + 1)


def test_async_persist_errors_surface(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    checkpointer = AsyncCheckpointer(blocker)
    checkpointer.save(1, {"w": np.zeros(4)})
    with pytest.raises(OSError):
        checkpointer.close()


def test_sync_save_reports_its_stall(tmp_path: Path) -> None:
    result = save_checkpoint(tmp_path, 3, {"w": np.zeros(10)})
    manifest = read_manifest(result.path)
    assert result.committed and result.stall_seconds >= result.persist_seconds > 0
    assert manifest.stall_seconds == pytest.approx(manifest.persist_seconds)
    assert manifest.total_bytes == result.size_bytes


def test_retention_on_disk_keeps_latest_complete(tmp_path: Path) -> None:
    for step in (100, 200, 300):
        save_checkpoint(tmp_path, step, {"w": np.full(4, step)})
    save_checkpoint(tmp_path, 400, {"w": np.zeros(4)}, rank=0, world_size=2)  # in progress
    deleted = apply_retention(tmp_path, RetentionPolicy(keep_last=1))
    assert deleted == [100, 200]
    assert [c.step for c in list_checkpoints(tmp_path)] == [300, 400]
    assert np.array_equal(load_checkpoint(tmp_path).state["w"], np.full(4, 300))


def test_shape_mismatch_and_bad_rank_are_rejected(tmp_path: Path) -> None:
    spec = even_shard((10,), 2, 0)
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, 1, {"w": np.zeros(4)}, world_size=2, shards={"w": spec})
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path, rank=2, world_size=2)


def test_even_shards_tile_the_axis() -> None:
    for length, world in itertools.product((1, 7, 64), (1, 3, 8)):
        specs = [even_shard((length, 2), world, r) for r in range(world)]
        assert sum(s.shape[0] for s in specs) == length
        assert [s.offsets[0] for s in specs] == list(np.cumsum([0] + [s.shape[0] for s in specs[:-1]]))


def test_a_restarted_gang_never_merges_a_torn_attempt(tmp_path: Path) -> None:
    old = {"w": np.zeros(8)}
    new = {"w": np.arange(8.0)}

    def shard(state: dict[str, np.ndarray], rank: int) -> tuple[dict[str, np.ndarray], dict[str, ShardSpec]]:
        part, spec = shard_array(state["w"], 2, rank)
        return {"w": part}, {"w": spec}

    # Attempt 0 crashed while saving step 50: only rank 1 finished.
    state, shards = shard(old, 1)
    assert not save_checkpoint(tmp_path, 50, state, rank=1, world_size=2, shards=shards, attempt=0).committed
    # Attempt 1 reaches step 50 again; rank 0 finishing first must not merge rank 1's old index.
    state, shards = shard(new, 0)
    assert not save_checkpoint(tmp_path, 50, state, rank=0, world_size=2, shards=shards, attempt=1).committed
    assert latest_complete(tmp_path) is None
    state, shards = shard(new, 1)
    assert save_checkpoint(tmp_path, 50, state, rank=1, world_size=2, shards=shards, attempt=1).committed
    loaded = load_checkpoint(tmp_path)
    assert np.array_equal(loaded.state["w"], new["w"])
    assert read_manifest(loaded.path).attempt == 1
