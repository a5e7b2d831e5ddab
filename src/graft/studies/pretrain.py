"""Source models: train a timm backbone on a related labelled image folder, save it for transfer.

The route next to "reuse a pre-trained model": develop a skilful source model on a related task
first. The training is graft's own machinery: a linear probe on the backbone's features
(:func:`graft.head.train_head`), then every block trained together with that head
(:func:`graft.finetune.finetune`, with a timm optimizer, layer decay and a cosine schedule).

The result is saved as the trunk's tensors in ``backbone.safetensors`` and a sidecar
``backbone.safetensors.json`` with the architecture, the file's sha256 and its pretrained config
(input size, interpolation, crop, mean, std). ``backbone.weights: file:PATH`` then loads it with
that preprocessing, and refuses a file whose hash is not the sidecar's.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors.torch import save_file
from torch import nn

from graft.backbones import (
    SIDECAR_FORMAT,
    Backbone,
    create_backbone,
    data_config_of,
    sidecar_path,
)
from graft.classifier import attach_head
from graft.config import FinetuneParams, HeadParams, PretrainParams, TrainingParams
from graft.data.manifest import usable_rows
from graft.data.splits import SPLITS
from graft.data_config import DataConfig
from graft.engines import Engine, make_runner
from graft.errors import InputError
from graft.features import forward_in_batches
from graft.files import file_sha256, replacing, write_json
from graft.finetune import finetune
from graft.head import train_head
from graft.preprocessing import eval_transform

WEIGHTS_NAME = "backbone.safetensors"


class PretrainError(InputError):
    """The source task cannot be trained as configured."""


@dataclass(frozen=True)
class LabelledImages:
    """One split: image files and their label indices."""

    paths: list[Path]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, fraction: float, seed: int) -> LabelledImages:
        """A stratified share of the images; smaller shares are subsets of larger ones."""
        if fraction >= 1.0:
            return self
        rng = np.random.default_rng(seed)
        keep = []
        for label in np.unique(self.labels):
            members = np.flatnonzero(self.labels == label)
            members = members[rng.permutation(len(members))]
            keep.extend(members[: max(1, round(fraction * len(members)))])
        keep = np.sort(np.asarray(keep))
        return LabelledImages([self.paths[i] for i in keep], self.labels[keep])


@dataclass(frozen=True)
class TaskData:
    """A classification task: its labels and its train, val and test images."""

    labels: list[str]
    train: LabelledImages
    val: LabelledImages
    test: LabelledImages


def task_data(manifest: pd.DataFrame, data_dir: Path, classes: Sequence[str], key: str) -> TaskData:
    """The usable images of ``classes`` (all classes when empty) from a validated manifest.

    Raises:
        PretrainError: naming ``key`` if a class is not in the data, or a split is left empty.
    """
    usable = usable_rows(manifest)
    present = sorted(usable["label"].unique())
    labels = list(classes) or present
    missing = [label for label in labels if label not in present]
    if missing:
        raise PretrainError(
            f"{key} names classes {missing} that {data_dir}/ has no usable images of; "
            f"its classes are {present}. Fix {key} in params.yaml."
        )
    if len(labels) < 2:
        raise PretrainError(f"{key} has {labels}: a classification task needs 2 classes or more.")
    rows = usable[usable["label"].isin(labels)]
    index_of = {label: i for i, label in enumerate(labels)}
    splits = {}
    for split in SPLITS:
        part = rows[rows["split"] == split]
        if part.empty:
            raise PretrainError(
                f"The {split} split of {data_dir}/ has no images of {labels} ({key}): add images."
            )
        splits[split] = LabelledImages(
            [data_dir / path for path in part["path"]],
            part["label"].map(index_of).to_numpy(dtype=np.int64),
        )
    return TaskData(labels, **splits)


def with_input_config(
    backbone: Backbone, image_size: int, interpolation: str, crop_pct: float
) -> Backbone:
    """``backbone`` with its pretrained config set to this input size, interpolation and crop.

    The config stays timm's (``resolve_model_data_config`` of the model), so every later
    transform and the saved sidecar read the same values.
    """
    model = backbone.model
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "input_size": (3, image_size, image_size),
        "interpolation": interpolation,
        "crop_pct": crop_pct,
    }
    return replace(backbone, data_config=data_config_of(model))


def with_data_config(backbone: Backbone, data_config: DataConfig) -> Backbone:
    """``backbone`` preprocessing exactly as ``data_config`` (another backbone's) says."""
    model = backbone.model
    model.pretrained_cfg = {**model.pretrained_cfg, **data_config.timm_kwargs()}
    return replace(backbone, data_config=data_config_of(model))


@dataclass
class TrainingRun:
    """A trained classifier (best epoch on val) and how it got there."""

    model: nn.Module
    probe_val_accuracy: float
    val_accuracy: float
    test_accuracy: float
    best_epoch: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = "completed"


def finetune_params(training: TrainingParams, blocks: int) -> FinetuneParams:
    """The fine-tuning settings that train all ``blocks`` blocks for the whole budget."""
    return FinetuneParams(
        unfreeze_blocks=blocks,
        epochs=training.epochs,
        lr=training.lr,
        layer_decay=training.layer_decay,
        warmup_epochs=training.warmup_epochs,
        weight_decay=training.weight_decay,
        label_smoothing=training.label_smoothing,
        batch_size=training.batch_size,
        bn=training.bn,
        patience=training.epochs,  # no early stop: every arm gets the same budget
        max_minutes=training.max_minutes,
        seed=training.seed,
    )


def train_classifier(
    backbone: Backbone,
    data: TaskData,
    training: TrainingParams,
    engine: Engine = "auto",
    name: str = "",
    *,
    trained_only: bool = False,
) -> TrainingRun:
    """A linear probe on ``backbone``'s features, then all its blocks trained with that head.

    ``history`` holds one record per epoch (epoch 0 = the probe) with the val accuracy and the
    wall-clock seconds since the start (the probe's feature extraction included).

    Args:
        trained_only: keep the best trained epoch even when the probe alone scored higher on
            val (a source model must be a trained one, not its initialisation).
    """
    started = time.monotonic()
    config = backbone.data_config
    transform = eval_transform(config)
    batch = training.batch_size
    runner = make_runner(backbone.model.eval(), config.input_size, 64, engine)
    train_x = forward_in_batches(runner, data.train.paths, transform, 64, f"{name} probe (train)")
    val_x = forward_in_batches(runner, data.val.paths, transform, 64, f"{name} probe (val)")
    head = train_head(
        train_x,
        data.train.labels,
        val_x,
        data.val.labels,
        len(data.labels),
        HeadParams(kind="linear", seed=training.seed),  # as the figures were measured
    )
    model = attach_head(backbone.model, head.head)
    seconds = {0: time.monotonic() - started}
    best_trained: dict[str, Any] = {"accuracy": -1.0}

    def on_epoch(record: dict[str, Any], trained: nn.Module) -> None:
        seconds[record["epoch"]] = time.monotonic() - started
        if trained_only and record["val_accuracy"] > best_trained["accuracy"]:
            state = {k: v.detach().cpu().clone() for k, v in trained.state_dict().items()}
            best_trained.update(accuracy=record["val_accuracy"], epoch=record["epoch"], state=state)
        print(
            f"{name} epoch {record['epoch']}: train loss {record['train_loss']:.4f}, "
            f"val accuracy {record['val_accuracy']:.4f}"
        )

    result = finetune(
        model,
        data.train.paths,
        data.train.labels,
        data.val.paths,
        data.val.labels,
        transform,
        config.input_size,
        finetune_params(training, len(model.blocks)),
        engine,
        on_epoch=on_epoch,
    )
    elapsed = time.monotonic() - started
    if trained_only and "state" in best_trained:
        result.state_dict = best_trained["state"]
        result.val_accuracy, result.best_epoch = best_trained["accuracy"], best_trained["epoch"]
    model.load_state_dict(result.state_dict)
    model.eval()
    test_accuracy = accuracy_on(model, data.test, transform, config.input_size, batch)
    history = [
        {"epoch": r["epoch"], "seconds": seconds.get(r["epoch"]), "val_accuracy": r["val_accuracy"]}
        for r in result.history
    ]
    return TrainingRun(
        model.cpu(),
        head.val_accuracy,
        result.val_accuracy,
        test_accuracy,
        result.best_epoch,
        elapsed,
        history,
        result.stopped,
    )


def accuracy_on(
    model: nn.Module,
    images: LabelledImages,
    transform,
    input_size: Sequence[int],
    batch_size: int,
) -> float:
    """Top-1 accuracy of ``model`` (a classifier) on ``images``, in eval mode."""
    runner = make_runner(model.eval(), list(input_size), batch_size, "torch")
    logits = forward_in_batches(runner, images.paths, transform, batch_size, "test accuracy")
    return float((logits.argmax(axis=1) == images.labels).mean())


def pretrain(data: TaskData, params: PretrainParams, engine: Engine = "auto") -> TrainingRun:
    """Train ``params.architecture`` from ``params.init`` weights on the source task.

    Raises:
        WeightsError: if the architecture or the initial weights cannot be had.
        FinetuneError: if the architecture is not of timm's EfficientNet family.
    """
    backbone = create_backbone(params.architecture, params.init, num_classes=0)
    backbone = with_input_config(backbone, params.image_size, params.interpolation, params.crop_pct)
    run = train_classifier(
        backbone, data, params.training, engine, name="pretrain", trained_only=True
    )
    run.model.pretrained_cfg = backbone.model.pretrained_cfg
    return run


def save_source_model(
    model: nn.Module, architecture: str, directory: Path, provenance: dict[str, Any]
) -> Path:
    """Write the trunk of ``model`` to ``directory/backbone.safetensors`` and its sidecar.

    The sidecar holds the architecture, the file's sha256, the pretrained config (input size,
    interpolation, crop, mean, std) and ``provenance`` (the source task, the training).
    Returns the weights file's path.
    """
    trunk = copy.deepcopy(model).cpu()
    trunk.reset_classifier(0)
    tensors = {key: value.contiguous() for key, value in trunk.state_dict().items()}
    path = directory / WEIGHTS_NAME
    with replacing(path) as temporary:
        save_file(tensors, str(temporary))
    write_json(
        sidecar_path(path),
        {
            "format": SIDECAR_FORMAT,
            "architecture": architecture,
            "weights_file": path.name,
            "sha256": file_sha256(path),
            "pretrained_cfg": data_config_of(trunk).as_dict(),
            "provenance": provenance,
        },
    )
    return path


def load_sidecar(weights_file: Path) -> dict[str, Any] | None:
    """The sidecar of a weights file written by :func:`save_source_model`, if it has one."""
    sidecar = sidecar_path(weights_file)
    if not sidecar.is_file():
        return None
    return json.loads(sidecar.read_text(encoding="utf-8"))
