"""Stage ``finetune``: LP-FT of the backbone's top blocks with the trained head."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from graft.classifier import Checkpoint, build_classifier, load_checkpoint, save_checkpoint
from graft.config import load_params
from graft.data.manifest import read_manifest
from graft.files import write_json, write_text_atomic
from graft.finetune import FinetuneResult, finetune
from graft.paths import ProjectPaths
from graft.preprocessing import eval_transform


def main(root: Path = Path(".")) -> FinetuneResult:
    paths = ProjectPaths(root)
    params = load_params(paths.params)
    head = load_checkpoint(paths.head_model)
    model = build_classifier(head)
    spec = head.spec
    if params.finetune.enabled and params.finetune.epochs > 0:
        manifest = read_manifest(paths.manifest)
        usable = manifest[manifest["status"] == "ok"]
        index_of = {label: i for i, label in enumerate(spec.labels)}

        def split_of(name: str) -> tuple[list[Path], np.ndarray]:
            rows = usable[usable["split"] == name]
            labels = rows["label"].map(index_of).to_numpy(dtype=np.int64)
            return [paths.data / p for p in rows["path"]], labels

        (train_paths, train_y), (val_paths, val_y) = split_of("train"), split_of("val")
        result = finetune(
            model,
            train_paths,
            train_y,
            val_paths,
            val_y,
            eval_transform(spec.data_config),
            spec.data_config["input_size"],
            params.finetune,
            params.features.engine,
        )
    else:
        head_val = float(head.info["val_accuracy"])
        result = FinetuneResult(model.state_dict(), head_val, head_val, 0, [])
    info = {"best_epoch": result.best_epoch, "val_accuracy": result.val_accuracy}
    save_checkpoint(paths.finetuned_model, Checkpoint(spec, "full", result.state_dict, info))
    write_json(
        paths.metrics / "finetune.json",
        {
            "skipped": not (params.finetune.enabled and params.finetune.epochs > 0),
            "head_val_accuracy": result.head_val_accuracy,
            "val_accuracy": result.val_accuracy,
            "best_epoch": result.best_epoch,
            "epochs_run": max(len(result.history) - 1, 0),
        },
    )
    write_text_atomic(paths.plots / "finetune_history.csv", _history_csv(result.history))
    print(
        f"finetune: val accuracy {result.val_accuracy:.4f} at epoch {result.best_epoch} "
        f"(head alone: {result.head_val_accuracy:.4f})"
    )
    return result


def _history_csv(history: list[dict[str, float]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["epoch", "train_loss", "val_accuracy"])
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()
