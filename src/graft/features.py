"""Pooled embeddings from the frozen backbone, and the per-split feature files that hold them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from graft.engines import Runner
from graft.errors import MissingInputError
from graft.files import replacing
from graft.preprocessing import load_tensor_batch
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


def forward_in_batches(
    runner: Runner,
    paths: Sequence[Path],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    description: str,
) -> np.ndarray:
    """Run ``runner`` over the images in batches, decoding the next batch while one runs.

    Returns:
        The stacked outputs as float32, one row per path.
    """
    chunks = [paths[start : start + batch_size] for start in range(0, len(paths), batch_size)]
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    outputs = []
    with ThreadPoolExecutor(max_workers=1) as decoder, progress(len(paths), description) as bar:
        pending = decoder.submit(load_tensor_batch, chunks[0], transform)
        for index, chunk in enumerate(chunks):
            batch = pending.result()
            if index + 1 < len(chunks):
                pending = decoder.submit(load_tensor_batch, chunks[index + 1], transform)
            outputs.append(runner(batch))
            bar.update(len(chunk))
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


def load_feature_set(path: Path) -> FeatureSet:
    if not path.is_file():
        raise MissingInputError(path)
    with np.load(path, allow_pickle=False) as archive:
        return FeatureSet(
            features=archive["features"],
            labels=archive["labels"],
            paths=archive["paths"],
            sha256=archive["sha256"],
        )
