"""A content-addressed store of image embeddings that outlives ``dvc repro``.

An embedding is identified by (backbone, weights sha256, preprocessing config, precision) and
the image's sha256. The first four make the *key*: one folder per key under the cache root,
holding the key in readable form (``key.json``), the exported engine (``backbone.onnx``, with
its sha256 in ``backbone.onnx.sha256``, checked before each use) and the embeddings in
*shards*, ``shards/<digest>.npz``, each a batch of images computed together.

A shard holds ``sha256`` (N image hashes), ``features`` (N x D float32) and ``checksum`` (sha256
of both), is written to a temporary name and renamed, and is verified when read: one that does
not load or whose checksum differs is reported with a :class:`CorruptShardWarning`, removed, and
its images are computed again. So a killed run loses at most the shard in flight.

The cache lives outside the DVC outputs (DVC deletes a stage's outputs before re-running it),
by default in the git-ignored ``.graft/cache/features/``, like DVC's own cache.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from graft.files import replacing, write_json, write_text_atomic

Precision = Literal["fp32", "int8"]
CACHE_FORMAT = "graft.feature_cache/1"
# The INT8 engine's recipe (graft.quantize): a new recipe gives INT8 embeddings a new key, so a
# cache quantized the old way is not reused. 2: constant padding, class-stratified calibration.
INT8_RECIPE = 2


class CorruptShardWarning(UserWarning):
    """A cache shard could not be read or failed its checksum; its images are recomputed."""


@dataclass(frozen=True)
class EmbeddingKey:
    """Everything besides the image that determines an embedding.

    Attributes:
        backbone: the timm model name.
        weights_sha256: the weights file's sha256, or ``state:<digest>`` of the tensors for
            weights without a file (``random``, ``hub``).
        data_config: timm's preprocessing config (input size, interpolation, crop, mean, std).
        precision: ``fp32`` or ``int8`` (the quantized engine).
    """

    backbone: str
    weights_sha256: str
    data_config: dict[str, Any]
    precision: Precision = "fp32"

    def digest(self) -> str:
        identity = {"format": CACHE_FORMAT, **asdict(self)}
        if self.precision == "int8":
            identity["int8_recipe"] = INT8_RECIPE
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def with_precision(self, precision: Precision) -> EmbeddingKey:
        return EmbeddingKey(self.backbone, self.weights_sha256, self.data_config, precision)


def _checksum(shas: np.ndarray, features: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update("\n".join(shas.tolist()).encode())
    digest.update(str(features.shape).encode())
    digest.update(np.ascontiguousarray(features, dtype=np.float32).tobytes())
    return digest.hexdigest()


class FeatureCache:
    """The shards and engine file of one :class:`EmbeddingKey` under the cache root ``root``."""

    def __init__(self, root: Path, key: EmbeddingKey) -> None:
        self.root = Path(root)
        self.key = key
        self.folder = self.root / key.digest()[:32]
        self.shards = self.folder / "shards"

    @property
    def onnx_path(self) -> Path:
        """Where this key's engine, exported (and for int8 quantized) once, is kept."""
        return self.folder / "backbone.onnx"

    @property
    def _engine_checksum_path(self) -> Path:
        return self.folder / "backbone.onnx.sha256"

    def verified_engine(self) -> bytes | None:
        """The engine file's bytes if it is there and matches the sha256 recorded when it was
        written; a file that differs (or has no record) is reported with a
        :class:`CorruptShardWarning`, removed, and None returned: export it again."""
        if not self.onnx_path.is_file():
            return None
        engine = self.onnx_path.read_bytes()
        recorded = (
            self._engine_checksum_path.read_text().strip()
            if self._engine_checksum_path.is_file()
            else None
        )
        if recorded != hashlib.sha256(engine).hexdigest():
            warnings.warn(
                f"Feature cache engine {self.onnx_path} does not match its recorded sha256 "
                f"({self._engine_checksum_path}); removed, it is exported again.",
                CorruptShardWarning,
                stacklevel=2,
            )
            self.onnx_path.unlink(missing_ok=True)
            self._engine_checksum_path.unlink(missing_ok=True)
            return None
        return engine

    def record_engine(self) -> bytes:
        """Record the sha256 of the engine file just written there; its bytes."""
        engine = self.onnx_path.read_bytes()
        write_text_atomic(self._engine_checksum_path, hashlib.sha256(engine).hexdigest() + "\n")
        return engine

    def describe(self) -> None:
        """Write ``key.json`` (what this folder holds) once; it is never read back."""
        path = self.folder / "key.json"
        if not path.is_file():
            write_json(path, {"format": CACHE_FORMAT, **asdict(self.key)})

    def shard_paths(self) -> list[Path]:
        return sorted(self.shards.glob("*.npz")) if self.shards.is_dir() else []

    def load(self, wanted: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached embedding of each image in ``wanted`` that has one, by image sha256.

        Shards holding none of ``wanted`` are not read beyond their list of hashes. A corrupt
        shard is reported with a :class:`CorruptShardWarning` and deleted.
        """
        wanted = set(wanted)
        found: dict[str, np.ndarray] = {}
        for path in self.shard_paths():
            if not wanted.difference(found):
                break
            shard = self._read_shard(path, wanted)
            if shard is None:
                continue
            shas, features = shard
            for sha, row in zip(shas.tolist(), features, strict=True):
                if sha in wanted:
                    found[sha] = row
        return found

    def _read_shard(self, path: Path, wanted: set[str]) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            with np.load(path, allow_pickle=False) as archive:
                shas = archive["sha256"]
                if not wanted.intersection(shas.tolist()):
                    return None
                features = archive["features"]
                stored = str(archive["checksum"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            self._discard(path, f"it does not load: {exc}")
            return None
        if (
            features.ndim != 2
            or features.shape[0] != len(shas)
            or _checksum(shas, features) != stored
        ):
            self._discard(path, "its checksum does not match its contents")
            return None
        return shas, features

    def _discard(self, path: Path, reason: str) -> None:
        warnings.warn(
            f"Feature cache shard {path} is corrupt ({reason}); removed, its images are "
            "computed again.",
            CorruptShardWarning,
            stacklevel=3,
        )
        path.unlink(missing_ok=True)

    def write_shard(self, shas: Sequence[str], features: np.ndarray) -> Path:
        """Store the embeddings of ``shas`` (rows of ``features``) as one new shard.

        The name is a digest of the image hashes, so writing the same images twice (two runs at
        once) gives one file; it is written through a temporary file and renamed.
        """
        shas_array = np.asarray(list(shas), dtype=str)
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(shas_array):
            raise ValueError(f"{len(shas_array)} hashes for features of shape {features.shape}")
        name = hashlib.sha256("\n".join(shas_array.tolist()).encode()).hexdigest()[:32]
        path = self.shards / f"{name}.npz"
        with replacing(path) as temporary, open(temporary, "wb") as handle:
            np.savez(
                handle,
                sha256=shas_array,
                features=features,
                checksum=np.asarray(_checksum(shas_array, features)),
            )
        return path
