"""Pooled embeddings from the frozen backbone, and the per-split feature files that hold them."""

from __future__ import annotations

import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from graft.engines import Runner
from graft.errors import MissingInputError
from graft.files import replacing
from graft.preprocessing import ImageSource, load_tensor_batch
from graft.progress import progress


@dataclass(frozen=True)
class FeatureSet:
    """One split's embeddings with the manifest rows they came from."""

    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64 indices into the label list
    paths: np.ndarray  # (N,) manifest paths, relative to the data folder
    sha256: np.ndarray  # (N,) content hashes

    def __len__(self) -> int:
        return len(self.labels)


def iter_batch_outputs(
    runner: Runner,
    sources: Sequence[ImageSource],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    prefetch: int = 2,
) -> Iterator[np.ndarray]:
    """Yield ``runner``'s output for each batch of ``sources``, in order.

    A decoding thread keeps up to ``prefetch`` batches decoded ahead of the one running (Pillow
    and the engines release the GIL), so decoding overlaps inference.
    """
    chunks = [sources[start : start + batch_size] for start in range(0, len(sources), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as decoder:
        pending = deque(
            decoder.submit(load_tensor_batch, chunk, transform) for chunk in chunks[:prefetch]
        )
        for index in range(len(chunks)):
            batch = pending.popleft().result()
            if index + prefetch < len(chunks):
                pending.append(
                    decoder.submit(load_tensor_batch, chunks[index + prefetch], transform)
                )
            yield runner(batch)


def forward_in_batches(
    runner: Runner,
    paths: Sequence[ImageSource],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    description: str,
    *,
    show_progress: bool = True,
) -> np.ndarray:
    """Run ``runner`` over the images in batches, decoding the next batches while one runs.

    Args:
        runner: an engine from :func:`graft.engines.make_runner`.
        paths: image files, or their bytes.
        transform: image to CHW tensor.
        batch_size: images per runner call.
        description: the progress bar's label (the bar shows images/s).
        show_progress: False for no bar (e.g. on a Dask worker).

    Returns:
        The stacked outputs as float32, one row per path.
    """
    if not paths:
        return np.zeros((0, 0), dtype=np.float32)
    outputs = []
    bar = progress(len(paths), description) if show_progress else None
    try:
        for output in iter_batch_outputs(runner, paths, transform, batch_size):
            outputs.append(output)
            if bar is not None:
                bar.update(len(output))
    finally:
        if bar is not None:
            bar.close()
    return np.concatenate(outputs).astype(np.float32, copy=False)


def save_feature_set(feature_set: FeatureSet, path: Path) -> None:
    """Write ``path`` (.npz) via a temporary file, so a killed run never leaves half a file."""
    with replacing(path) as temporary, open(temporary, "wb") as handle:
        np.savez(
            handle,
            features=feature_set.features,
            labels=feature_set.labels,
            paths=feature_set.paths.astype(str),
            sha256=feature_set.sha256.astype(str),
        )


def load_feature_set(path: Path, *, mmap: bool = False) -> FeatureSet:
    """One split's feature file; ``mmap``: the features memory-mapped from it, read on demand
    (``np.savez`` stores its members uncompressed, so the matrix lies in the file as it is)."""
    if not path.is_file():
        raise MissingInputError(path)
    with np.load(path, allow_pickle=False) as archive:
        return FeatureSet(
            features=_mapped_member(path, "features") if mmap else archive["features"],
            labels=archive["labels"],
            paths=archive["paths"],
            sha256=archive["sha256"],
        )


def _mapped_member(path: Path, name: str) -> np.ndarray:
    """The array ``name`` of the uncompressed .npz ``path`` as a read-only memory map."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(path, allow_pickle=False) as archive:
            return archive[name]
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)  # the local file header: its name and extra field lengths follow
        name_length = int.from_bytes(local[26:28], "little")
        extra_length = int.from_bytes(local[28:30], "little")
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        readers = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        if version not in readers:
            with np.load(path, allow_pickle=False) as archive:
                return archive[name]
        shape, fortran, dtype = readers[version](handle)
        offset = handle.tell()
    if not shape or 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype, "r", offset, shape, "F" if fortran else "C")
