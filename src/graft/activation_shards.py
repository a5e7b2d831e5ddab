"""The frozen prefix's activations of one split: in memory within a budget, else on disk shards.

Fine-tuning trains the top of the backbone on the activations at the cut, one row per image
(C x H x W float32, tens of KB). A split whose rows fit ``finetune.prefix_memory_mb`` is held as
one tensor (:class:`InMemoryActivations`), as it always was. A larger split is written, as its
batches come out of the prefix, to *shards* in a scratch folder (:class:`ShardedActivations`):
``NNNNNN.npz`` holding ``rows`` (the rows' indices in the split), ``activations`` and
``crc32`` (of the activations' bytes), written to a temporary name and renamed, like the
feature cache's shards (graft.feature_cache), and verified when read.

Training reads them back with ``np.load`` (plain reads, not a memory map: mapped pages would
count in the resident set as they are touched), visiting the shards in a seeded random order
and shuffling the rows within a buffer of :data:`BUFFER_SHARDS` shards, so every row is seen once
per epoch and the rows held at once stay within the budget whatever the number of images.

The scratch folder (:class:`ScratchSpace`) is removed when the run ends, on error too; one left by
a killed process is removed by the next run that opens a scratch space in the same place.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from graft.errors import GraftError
from graft.files import replacing

BUFFER_SHARDS = 4  # shards shuffled together: the working set is this many shards (and batches)
_RUN_PREFIX = "run-"


class ActivationShardError(GraftError):
    """A scratch shard of activations does not read back as it was written."""


class ScratchSpace:
    """One run's scratch folder under ``root``, made when first asked for and removed by
    :meth:`close`; it tracks the bytes of shards on disk (now and at most)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._folder: Path | None = None
        self._count = 0
        self.bytes_now = 0
        self.peak_bytes = 0

    @property
    def folder(self) -> Path:
        if self._folder is None:
            remove_stale(self.root)
            self.root.mkdir(parents=True, exist_ok=True)
            self._folder = self.root / f"{_RUN_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            self._folder.mkdir()
        return self._folder

    def subfolder(self) -> Path:
        """A new empty folder inside this run's scratch folder."""
        self._count += 1
        path = self.folder / f"{self._count:04d}"
        path.mkdir()
        return path

    def written(self, nbytes: int) -> None:
        self.bytes_now += nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes_now)

    def released(self, nbytes: int) -> None:
        self.bytes_now -= nbytes

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        self.bytes_now = 0

    def __enter__(self) -> ScratchSpace:
        remove_stale(self.root)  # a killed run's, whether or not this run streams
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def remove_stale(root: Path) -> list[Path]:
    """Remove the scratch folders under ``root`` whose process has ended (a killed run's)."""
    removed: list[Path] = []
    for folder in Path(root).glob(f"{_RUN_PREFIX}*"):
        try:
            pid = int(folder.name[len(_RUN_PREFIX) :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class InMemoryActivations:
    """A split's activations as one tensor (on the training device)."""

    streamed = False
    bytes_on_disk = 0
    shards = 0

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.max_resident_rows = len(tensor)

    def __len__(self) -> int:
        return len(self.tensor)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """The rows in order, ``size`` at a time."""
        yield from self.tensor.split(size)

    def batches(
        self, size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(row indices, activations) of an epoch's batches: every row once, in random order."""
        order = torch.randperm(len(self.tensor), generator=generator).to(self.tensor.device)
        for batch in order.split(size):
            yield batch, self.tensor[batch]

    def close(self) -> None:
        pass


class ShardedActivations:
    """A split's activations in shards on disk, read back a few shards at a time.

    ``max_resident_rows`` records the most rows it has held in memory at once (the shards
    loaded, the rows carried over to the next buffer and the batch being built).
    """

    streamed = True

    def __init__(
        self,
        folder: Path,
        shards: list[tuple[Path, int]],
        row_shape: tuple[int, ...],
        device: torch.device,
        memory_format: torch.memory_format,
        scratch: ScratchSpace | None = None,
    ) -> None:
        self.folder, self.shard_list, self.row_shape = folder, shards, row_shape
        self.device, self.memory_format, self.scratch = device, memory_format, scratch
        self.rows = sum(count for _, count in shards)
        self.bytes_on_disk = sum(path.stat().st_size for path, _ in shards)
        self.max_resident_rows = 0

    def __len__(self) -> int:
        return self.rows

    @property
    def shards(self) -> int:
        return len(self.shard_list)

    @property
    def nbytes(self) -> int:
        return self.rows * int(np.prod(self.row_shape)) * 4

    def _hold(self, rows: int) -> None:
        self.max_resident_rows = max(self.max_resident_rows, rows)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array).to(self.device)
        return tensor.contiguous(memory_format=self.memory_format)

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """The rows in order, ``size`` at a time, one shard in memory at once."""
        for path, _ in self.shard_list:
            _, activations = read_shard(path)
            self._hold(len(activations))
            for start in range(0, len(activations), size):
                yield self._tensor(activations[start : start + size])

    def batches(
        self, size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(row indices, activations) of an epoch's batches: the shards in random order, the rows
        shuffled within :data:`BUFFER_SHARDS` shards at a time; every row once, and every batch
        but the epoch's last full (rows left over are carried into the next buffer)."""
        order = torch.randperm(len(self.shard_list), generator=generator).tolist()
        carry_rows = np.zeros(0, dtype=np.int64)
        carry = np.zeros((0, *self.row_shape), dtype=np.float32)
        for start in range(0, len(order), BUFFER_SHARDS):
            chosen = order[start : start + BUFFER_SHARDS]
            loaded = [read_shard(self.shard_list[i][0]) for i in chosen]
            blocks = [carry] + [activations for _, activations in loaded]
            rows = np.concatenate([carry_rows] + [indices for indices, _ in loaded])
            block_of = np.concatenate([np.full(len(b), k) for k, b in enumerate(blocks)])
            offset_of = np.concatenate([np.arange(len(b)) for b in blocks])
            held = len(rows)
            del loaded
            permutation = torch.randperm(held, generator=generator).numpy()
            last = start + BUFFER_SHARDS >= len(order)
            full = held if last else held // size * size
            for begin in range(0, full, size):
                pick = permutation[begin : begin + size]
                self._hold(held + len(pick))
                batch = _gather(blocks, block_of[pick], offset_of[pick], self.row_shape)
                yield torch.from_numpy(rows[pick]), self._tensor(batch)
            rest = permutation[full:]
            carry = _gather(blocks, block_of[rest], offset_of[rest], self.row_shape)
            carry_rows = rows[rest]

    def close(self) -> None:
        """Delete the shards (the scratch folder itself goes with the run)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.scratch is not None:
            self.scratch.released(self.bytes_on_disk)
        self.shard_list, self.bytes_on_disk = [], 0


def _gather(
    blocks: list[np.ndarray], block_of: np.ndarray, offset_of: np.ndarray, row_shape
) -> np.ndarray:
    out = np.empty((len(block_of), *row_shape), dtype=np.float32)
    for block in np.unique(block_of):
        chosen = block_of == block
        out[chosen] = blocks[block][offset_of[chosen]]
    return out


def _crc32(activations: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(activations)).cast("B"))


def write_shard(path: Path, rows: np.ndarray, activations: np.ndarray) -> int:
    """Write one shard through a temporary name; its size in bytes."""
    activations = np.ascontiguousarray(activations, dtype=np.float32)
    with replacing(path) as temporary, open(temporary, "wb") as handle:
        np.savez(
            handle,
            rows=np.asarray(rows, dtype=np.int64),
            activations=activations,
            crc32=np.asarray(_crc32(activations), dtype=np.int64),
        )
    return path.stat().st_size


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, activations) of a shard, read into memory and verified.

    Raises:
        ActivationShardError: the shard does not load or its checksum differs.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            rows, activations = archive["rows"], archive["activations"]
            stored = int(archive["crc32"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ActivationShardError(
            f"The fine-tuning scratch shard {path} does not load ({exc}): the scratch disk "
            "failed or was changed while fine-tuning ran."
        ) from exc
    if len(rows) != len(activations) or _crc32(activations) != stored:
        raise ActivationShardError(
            f"The fine-tuning scratch shard {path} fails its checksum: the scratch disk failed "
            "or was changed while fine-tuning ran."
        )
    return rows, activations


def store_activations(
    outputs: Iterable[np.ndarray],
    rows: int,
    budget_bytes: int,
    batch_size: int,
    scratch: ScratchSpace,
    device: torch.device,
    memory_format: torch.memory_format,
) -> InMemoryActivations | ShardedActivations:
    """Collect a split's activations, batch by batch as they come out of the prefix: in memory
    if all ``rows`` fit ``budget_bytes``, else into shards in a new folder of ``scratch``.

    Shards hold ``(budget rows - 2 batches) / BUFFER_SHARDS`` rows (at least one), so that the
    buffer of shards read back, the rows carried over and the batch built stay within the budget.
    """
    iterator = iter(outputs)
    first = next(iterator, None)
    if first is None:
        return InMemoryActivations(torch.zeros((0, 0), device=device))
    first = np.asarray(first, dtype=np.float32)
    row_shape = first.shape[1:]
    row_bytes = max(int(np.prod(row_shape)) * 4, 1)
    if rows * row_bytes <= budget_bytes:
        array = np.empty((rows, *row_shape), dtype=np.float32)
        filled = 0
        for output in itertools.chain([first], iterator):
            array[filled : filled + len(output)] = output
            filled += len(output)
        tensor = torch.from_numpy(array).to(device).contiguous(memory_format=memory_format)
        return InMemoryActivations(tensor)
    budget_rows = budget_bytes // row_bytes
    shard_rows = max(1, (budget_rows - 2 * batch_size) // BUFFER_SHARDS)
    folder = scratch.subfolder()
    shards: list[tuple[Path, int]] = []
    pending = np.empty((shard_rows, *row_shape), dtype=np.float32)
    held, done = 0, 0

    def flush() -> None:
        nonlocal held, done
        path = folder / f"{len(shards):06d}.npz"
        scratch.written(write_shard(path, np.arange(done, done + held), pending[:held]))
        shards.append((path, held))
        done, held = done + held, 0

    for output in itertools.chain([first], iterator):
        output = np.asarray(output, dtype=np.float32)
        taken = 0
        while taken < len(output):
            count = min(shard_rows - held, len(output) - taken)
            pending[held : held + count] = output[taken : taken + count]
            held, taken = held + count, taken + count
            if held == shard_rows:
                flush()
    if held:
        flush()
    return ShardedActivations(folder, shards, row_shape, device, memory_format, scratch)
