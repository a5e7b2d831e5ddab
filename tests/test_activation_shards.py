"""The frozen prefix's activations of a split: held in memory within the budget, else written to
disk shards and streamed back a few shards at a time, every row once per epoch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graft.activation_shards import (
    ActivationShardError,
    ScratchSpace,
    remove_stale,
    store_activations,
)

ROW_SHAPE = (2, 3, 3)
ROW_BYTES = int(np.prod(ROW_SHAPE)) * 4


def outputs(rows: int, batch: int = 7):
    """The prefix's batches: each row filled with its own index, so a row says which it is."""
    for start in range(0, rows, batch):
        count = min(batch, rows - start)
        yield np.arange(start, start + count, dtype=np.float32)[:, None, None, None] * np.ones(
            ROW_SHAPE, dtype=np.float32
        )


def store(rows: int, budget_rows: int, scratch: ScratchSpace, batch_size: int = 4):
    return store_activations(
        outputs(rows),
        rows,
        budget_rows * ROW_BYTES,
        batch_size,
        scratch,
        torch.device("cpu"),
        torch.contiguous_format,
    )


def epoch(stored, seed: int, batch_size: int = 4) -> tuple[list[int], list[int]]:
    rows, sizes = [], []
    for indices, activations in stored.batches(batch_size, torch.Generator().manual_seed(seed)):
        assert torch.equal(activations[:, 0, 0, 0], indices.float())  # each row its own
        rows += indices.tolist()
        sizes.append(len(indices))
    return rows, sizes


def test_a_split_over_the_budget_is_streamed_every_row_once_within_the_budget(tmp_path):
    with ScratchSpace(tmp_path) as scratch:
        stored = store(101, budget_rows=40, scratch=scratch)
        assert stored.streamed and stored.shards > 4 and stored.bytes_on_disk > 101 * ROW_BYTES
        first, sizes = epoch(stored, seed=1)
        second, _ = epoch(stored, seed=2)
        assert sorted(first) == sorted(second) == list(range(101))
        assert first != second and first != sorted(first)  # shuffled, differently each epoch
        assert epoch(stored, seed=1)[0] == first  # seeded
        assert sizes == [4] * 25 + [1]  # every batch full but the last
        assert 0 < stored.max_resident_rows <= 40
        chunks = list(stored.chunks(16))
        assert torch.cat(chunks)[:, 0, 0, 0].tolist() == list(range(101))  # in order
        assert scratch.peak_bytes == stored.bytes_on_disk
        stored.close()
        assert scratch.bytes_now == 0 and not stored.folder.exists()
        folder = scratch.folder
    assert not folder.exists()


def test_a_split_within_the_budget_stays_in_memory(tmp_path):
    with ScratchSpace(tmp_path) as scratch:
        stored = store(30, budget_rows=30, scratch=scratch)
        assert not stored.streamed and stored.bytes_on_disk == 0
        assert stored.tensor[:, 0, 0, 0].tolist() == list(range(30))
        rows, _ = epoch(stored, seed=0)
        assert sorted(rows) == list(range(30))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no scratch was made


def test_a_damaged_shard_is_refused_naming_it(tmp_path):
    with ScratchSpace(tmp_path) as scratch:
        stored = store(50, budget_rows=20, scratch=scratch)
        damaged = stored.shard_list[1][0]
        data = bytearray(damaged.read_bytes())
        data[-200] ^= 0xFF  # inside the activations
        damaged.write_bytes(bytes(data))
        with pytest.raises(ActivationShardError, match=damaged.name):
            list(stored.chunks(8))


def test_the_scratch_of_a_killed_run_is_removed_by_the_next(tmp_path):
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(child.stdout)  # a process that has ended
    stale = tmp_path / f"run-{dead}-abcd"
    (stale / "0001").mkdir(parents=True)
    (stale / "0001" / "000000.npz").write_bytes(b"x" * 1000)
    mine = tmp_path / f"run-{os.getpid()}-ef01"
    mine.mkdir()
    with ScratchSpace(tmp_path):  # even a run that streams nothing
        assert not stale.exists() and mine.exists()  # a live process's scratch is kept
    assert remove_stale(tmp_path) == [] and mine.exists()


def test_the_scratch_is_removed_when_the_run_fails(tmp_path: Path):
    with pytest.raises(RuntimeError), ScratchSpace(tmp_path) as scratch:
        store(50, budget_rows=20, scratch=scratch)
        assert any(scratch.folder.rglob("*.npz"))
        raise RuntimeError("training failed")
    assert list(tmp_path.iterdir()) == []
