"""Embed images with a frozen backbone through the content-addressed feature cache.

:func:`embed` is the one entry point: given manifest rows and a backbone, it returns one
:class:`~graft.features.FeatureSet` per split, computing only the images the cache lacks, in
shards. Shards are computed in this process, or on a Dask cluster (``features.workers > 1``
starts a local one, ``features.dask_scheduler`` names a running one) by the same function,
:func:`compute_shard`, from the same engine file; the client writes each returned shard into
the cache. The INT8 engine is an onnxruntime static quantization of the fp32 export, kept in
the cache under its own key (precision is part of the key); :func:`int8_gate` decides whether
its features are good enough.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from graft.backbones import Backbone, create_backbone, state_dict_sha256
from graft.config import BackboneParams, FeaturesParams, HeadParams
from graft.data.splits import SPLITS
from graft.data_config import DataConfig
from graft.engines import (
    RUN_MEMORY_MB,
    OnnxRunner,
    Runner,
    TorchRunner,
    export_engine,
    resolve_engine,
)
from graft.errors import GraftError
from graft.feature_cache import EmbeddingKey, FeatureCache, Precision
from graft.features import FeatureSet, forward_in_batches, iter_batch_outputs
from graft.preprocessing import ImageSource, eval_transform, load_tensor_batch
from graft.progress import progress
from graft.quantize import calibration_sample, quantize_static_qdq


class EmbeddingError(GraftError):
    """Embeddings cannot be computed as configured."""


@dataclass
class EmbedReport:
    """What one :func:`embed` call did (``computed`` images were decoded and run)."""

    images: int = 0
    reused: int = 0
    computed: int = 0
    shards_written: int = 0
    calibrated: bool = False
    seconds: float = 0.0
    where: str = "in-process"

    @property
    def computed_per_s(self) -> float:
        return self.computed / self.seconds if self.computed and self.seconds else 0.0


@dataclass
class Embedding:
    """Per-split feature matrices and how they were obtained."""

    feature_sets: dict[str, FeatureSet]
    backbone: Backbone
    labels: list[str]
    key: EmbeddingKey
    report: EmbedReport = field(default_factory=EmbedReport)


def embedding_key(backbone: Backbone, precision: Precision = "fp32") -> EmbeddingKey:
    weights = backbone.weights_sha256 or f"state:{state_dict_sha256(backbone.model)}"
    return EmbeddingKey(backbone.name, weights, backbone.data_config.as_dict(), precision)


def embed(
    rows: pd.DataFrame,
    data_dir: Path,
    backbone: BackboneParams | Backbone,
    params: FeaturesParams,
    cache_dir: Path,
    *,
    labels: Sequence[str] | None = None,
    precision: Precision | None = None,
    on_shard: Callable[[Path], None] | None = None,
) -> Embedding:
    """Embed the images of ``rows`` with ``backbone``, reusing every cached embedding.

    Args:
        rows: manifest rows (columns ``path``, ``label``, ``split``, ``sha256``) of usable images;
            the output keeps their order within each split.
        data_dir: the folder the manifest paths are relative to.
        backbone: the ``backbone`` params (name, weights, sha256) or an already built backbone.
        params: the ``features`` params (batch size, engine, shard size, workers, ...).
        cache_dir: the cache root (``features.cache_dir``).
        labels: the label order for the label indices; default: the sorted labels of ``rows``.
        precision: ``fp32`` or ``int8``; default ``params.precision``.
        on_shard: called with each shard's path once it is written.

    Returns:
        One FeatureSet per split in ``SPLITS`` (empty where a split has no rows).

    Raises:
        WeightsError: if the weights are missing or not the expected ones.
        EmbeddingError: if INT8 is asked of the torch engine, or the Dask scheduler is unreachable.
    """
    started = time.perf_counter()
    precision = precision or params.precision
    if isinstance(backbone, BackboneParams):
        backbone = create_backbone(backbone.name, backbone.weights, expected_sha256=backbone.sha256)
    labels = sorted(rows["label"].unique()) if labels is None else list(labels)
    key = embedding_key(backbone, precision)
    cache = FeatureCache(cache_dir, key)
    path_of = dict(zip(rows["sha256"], rows["path"], strict=True))  # first path of each content
    found = cache.load(path_of)
    missing = [sha for sha in path_of if sha not in found]
    report = EmbedReport(images=len(rows), reused=len(path_of) - len(missing))
    if missing:
        had_engine = cache.onnx_path.is_file()
        cache.describe()
        sources = [Path(data_dir) / path_of[sha] for sha in missing]
        compute = _compute_on_dask if params.dask_scheduler or params.workers > 1 else _compute
        for shas, features in compute(missing, sources, backbone, cache, params, rows, data_dir):
            shard = cache.write_shard(shas, features)
            found.update(zip(shas, features, strict=True))
            report.computed += len(shas)
            report.shards_written += 1
            if on_shard is not None:
                on_shard(shard)
        report.calibrated = precision == "int8" and not had_engine
        report.where = "in-process" if compute is _compute else "dask"
    feature_sets = _assemble(rows, found, labels, backbone.num_features)
    report.seconds = time.perf_counter() - started
    return Embedding(feature_sets, backbone, labels, key, report)


def _assemble(
    rows: pd.DataFrame, found: dict[str, np.ndarray], labels: list[str], width: int
) -> dict[str, FeatureSet]:
    index_of = {label: i for i, label in enumerate(labels)}
    sets = {}
    for split in SPLITS:
        part = rows[rows["split"] == split]
        shas = part["sha256"].to_numpy(dtype=str)
        features = (
            np.stack([found[sha] for sha in shas]).astype(np.float32, copy=False)
            if len(shas)
            else np.zeros((0, width), dtype=np.float32)
        )
        sets[split] = FeatureSet(
            features=features,
            labels=part["label"].map(index_of).to_numpy(dtype=np.int64),
            paths=part["path"].to_numpy(dtype=str),
            sha256=shas,
        )
    return sets


# --- the engine, built once per key ------------------------------------------------------------


@dataclass(frozen=True)
class EngineSpec:
    """What a process needs to build the runner for one key: an ONNX file or a timm backbone."""

    key: str
    engine: str  # "onnxruntime" or "torch"
    input_size: tuple[int, ...]
    batch_size: int
    data_config: DataConfig
    onnx: bytes | None = None  # onnxruntime: the exported (or quantized) model
    backbone: tuple[str, str, str | None] | None = None  # torch: (name, weights, sha256)
    threads: int | None = None
    run_memory_mb: float = RUN_MEMORY_MB  # onnxruntime: a run's activations at most


def engine_spec(
    backbone: Backbone,
    cache: FeatureCache,
    params: FeaturesParams,
    calibration: Callable[[], Iterator[np.ndarray]],
    *,
    threads: int | None = None,
) -> EngineSpec:
    """Prepare the engine of ``cache``'s key: export (and quantize) into the cache if needed."""
    precision = cache.key.precision
    engine = resolve_engine(params.engine)
    input_size = backbone.data_config.input_size
    common = dict(
        key=cache.key.digest(),
        input_size=input_size,
        batch_size=params.batch_size,
        data_config=backbone.data_config,
        threads=threads,
        run_memory_mb=params.run_memory_mb,
    )
    if precision == "int8":
        if params.engine == "torch":
            raise EmbeddingError(
                "features.precision: int8 runs on onnxruntime; set features.engine to "
                "onnxruntime or auto (or precision to fp32 for the torch engine)."
            )
        return EngineSpec(
            engine="onnxruntime", onnx=_int8_engine(backbone, cache, calibration), **common
        )
    if engine == "onnxruntime":
        return EngineSpec(engine="onnxruntime", onnx=_fp32_engine(backbone, cache), **common)
    source = (backbone.name, backbone.weights, backbone.weights_sha256)
    return EngineSpec(engine="torch", backbone=source, **common)


def _fp32_engine(backbone: Backbone, cache: FeatureCache) -> bytes:
    """The cached fp32 engine, exported (again) unless an intact one is there."""
    engine = cache.verified_engine()
    if engine is None:
        export_engine(backbone.model, backbone.data_config.input_size, cache.onnx_path)
        engine = cache.record_engine()
    return engine


def _int8_engine(
    backbone: Backbone, cache: FeatureCache, calibration: Callable[[], Iterator[np.ndarray]]
) -> bytes:
    """The cached INT8 engine, quantized (again) unless an intact one is there.

    It is quantized from a fresh export, not from the cached fp32 engine: an fp32 engine
    exported by an older graft (padding computed at run time) gives the same fp32 features but
    quantizes badly.
    """
    engine = cache.verified_engine()
    if engine is not None:
        return engine
    print(f"features: quantizing {backbone.name} to INT8, calibrated on training images")
    with tempfile.TemporaryDirectory(prefix="graft-int8-") as folder:
        fp32 = export_engine(
            backbone.model, backbone.data_config.input_size, Path(folder) / "fp32.onnx"
        )
        quantize_static_qdq(fp32, cache.onnx_path, calibration())
    return cache.record_engine()


_RUNNERS: dict[str, Runner] = {}
_RUNNERS_LOCK = threading.Lock()


def runner_for(spec: EngineSpec, module: Any = None) -> Runner:
    """The runner of ``spec``, built once per process (a Dask worker keeps it between shards)."""
    identity = f"{spec.key}:{spec.engine}:{spec.batch_size}:{spec.threads}:{spec.run_memory_mb}"
    with _RUNNERS_LOCK:
        if identity not in _RUNNERS:
            _RUNNERS.clear()  # one engine at a time: a long-lived worker does not pile up models
            _RUNNERS[identity] = _build_runner(spec, module)
        return _RUNNERS[identity]


def _build_runner(spec: EngineSpec, module: Any) -> Runner:
    if spec.engine == "torch":
        if module is None:
            name, weights, sha256 = spec.backbone
            module = create_backbone(name, weights, expected_sha256=sha256).model
        return TorchRunner(module)
    with tempfile.TemporaryDirectory(prefix="graft-engine-") as folder:
        path = Path(folder) / "backbone.onnx"
        path.write_bytes(spec.onnx)
        return OnnxRunner(
            None,
            spec.input_size,
            spec.batch_size,
            onnx_path=path,
            threads=spec.threads,
            run_memory_mb=spec.run_memory_mb,
        )


def compute_shard(spec: EngineSpec, sources: Sequence[ImageSource]) -> np.ndarray:
    """Embed one shard's images (files or their bytes): the unit of work on a Dask worker."""
    transform = eval_transform(spec.data_config)
    return forward_in_batches(
        runner_for(spec), list(sources), transform, spec.batch_size, "shard", show_progress=False
    )


def _calibration(
    rows: pd.DataFrame, data_dir: Path, data_config: DataConfig, params: FeaturesParams
) -> Callable[[], Iterator[np.ndarray]]:
    """Batches of training images for INT8: every class in proportion (graft.quantize)."""

    def batches() -> Iterator[np.ndarray]:
        train = rows[rows["split"] == "train"]
        pool = train if len(train) else rows
        chosen = calibration_sample(
            pool["label"].to_numpy(), pool["sha256"].to_numpy(), params.int8_calibration_images
        )
        paths = [Path(data_dir) / p for p in pool["path"].to_numpy()[chosen]]
        transform = eval_transform(data_config)
        for start in range(0, len(paths), params.batch_size):
            yield load_tensor_batch(paths[start : start + params.batch_size], transform).numpy()

    return batches


def _compute(
    missing: list[str],
    sources: list[Path],
    backbone: Backbone,
    cache: FeatureCache,
    params: FeaturesParams,
    rows: pd.DataFrame,
    data_dir: Path,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """In-process: one engine, one decode pipeline across shards, one progress bar."""
    calibration = _calibration(rows, data_dir, backbone.data_config, params)
    spec = engine_spec(backbone, cache, params, calibration)
    runner = runner_for(spec, backbone.model if spec.engine == "torch" else None)
    transform = eval_transform(backbone.data_config)
    buffered: list[np.ndarray] = []
    done = 0
    label = f"features {cache.key.precision} ({spec.engine})"
    with progress(len(sources), label) as bar:
        for output in iter_batch_outputs(runner, sources, transform, params.batch_size):
            buffered.append(output)
            bar.update(len(output))
            stacked = np.concatenate(buffered)
            while len(stacked) >= params.shard_size:
                yield missing[done : done + params.shard_size], stacked[: params.shard_size]
                done += params.shard_size
                stacked = stacked[params.shard_size :]
            buffered = [stacked]
        if done < len(missing):
            yield missing[done:], np.concatenate(buffered)


# --- Dask -----------------------------------------------------------------------------------


@contextmanager
def dask_client(params: FeaturesParams) -> Iterator[Any]:
    """A client of ``features.dask_scheduler``, or of a LocalCluster of ``features.workers``."""
    from dask.distributed import Client, LocalCluster

    if params.dask_scheduler:
        try:
            client = Client(params.dask_scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise EmbeddingError(
                f"Cannot reach the Dask scheduler at {params.dask_scheduler} "
                f"(features.dask_scheduler in params.yaml): {exc}. Start it with "
                "`dask scheduler` and workers with `dask worker ADDRESS`, or unset the key."
            ) from exc
        with client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=params.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _compute_on_dask(
    missing: list[str],
    sources: list[Path],
    backbone: Backbone,
    cache: FeatureCache,
    params: FeaturesParams,
    rows: pd.DataFrame,
    data_dir: Path,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """On a Dask cluster: shards of image bytes go out, embeddings come back, in any order.

    Workers need graft's environment but no access to the data or the cache: the client reads
    the files' bytes (no decoding) and ships them with the engine file.
    """
    from dask.distributed import as_completed

    calibration = _calibration(rows, data_dir, backbone.data_config, params)
    local = not params.dask_scheduler
    threads = max(1, (os.cpu_count() or 1) // params.workers) if local else None
    spec = engine_spec(backbone, cache, params, calibration, threads=threads)
    starts = list(range(0, len(missing), params.shard_size))
    with dask_client(params) as client:
        spec_future = client.scatter(spec, broadcast=True)
        in_flight = 2 * max(1, len(client.scheduler_info().get("workers", {})))

        start_of: dict[str, int] = {}

        def submit(start: int):
            images = [path.read_bytes() for path in sources[start : start + params.shard_size]]
            future = client.submit(compute_shard, spec_future, images, pure=False)
            start_of[future.key] = start
            return future

        queue = iter(starts)
        running = as_completed([submit(start) for start in itertools.islice(queue, in_flight)])
        label = f"features {cache.key.precision} ({spec.engine}, dask)"
        with progress(len(sources), label) as bar:
            for future in running:
                start = start_of.pop(future.key)
                features = future.result()
                next_start = next(queue, None)
                if next_start is not None:
                    running.add(submit(next_start))
                shas = missing[start : start + params.shard_size]
                bar.update(len(shas))
                yield shas, features


# --- INT8 acceptance ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8Decision:
    """Whether INT8 features are accepted, from heads trained on each precision's features."""

    accepted: bool
    fp32_val_accuracy: float
    int8_val_accuracy: float
    drop_points: float
    max_drop_points: float
    reason: str


def int8_gate(
    fp32: dict[str, FeatureSet],
    int8: dict[str, FeatureSet],
    num_classes: int,
    head: HeadParams,
    max_drop_points: float,
) -> Int8Decision:
    """Accept INT8 when a head trained on its features is within ``max_drop_points`` on val.

    Both heads are trained exactly as ``train_head`` trains one (same params and seed).
    Without val images there is nothing to compare, and INT8 is refused (fail closed).
    """
    from graft.head import train_head

    def val_accuracy(sets: dict[str, FeatureSet]) -> float:
        train, val = sets["train"], sets["val"]
        result = train_head(
            train.features, train.labels, val.features, val.labels, num_classes, head
        )
        return float(result.val_accuracy)

    fp32_acc, int8_acc = val_accuracy(fp32), val_accuracy(int8)
    drop = (fp32_acc - int8_acc) * 100.0
    if not np.isfinite(drop):
        accepted, reason = False, "no val images to compare INT8 with fp32 on"
    elif drop <= max_drop_points:
        accepted = True
        reason = f"val accuracy {int8_acc:.4f} vs fp32 {fp32_acc:.4f}: within {max_drop_points} pt"
    else:
        accepted = False
        reason = (
            f"val accuracy {int8_acc:.4f} vs fp32 {fp32_acc:.4f}: {drop:.2f} points lower, more "
            f"than features.int8_max_val_drop = {max_drop_points}"
        )
    return Int8Decision(accepted, fp32_acc, int8_acc, drop, max_drop_points, reason)
