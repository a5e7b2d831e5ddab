"""Stage ``finetune``: LP-FT of the backbone's top blocks with the trained head.

Writes the best model on val (the head itself when fine-tuning never beat it: the fallback),
``metrics/finetune.json`` with both val accuracies, the learning curve, and a DVCLive log. The
per-epoch resume checkpoints live in ``models/checkpoints/`` until the run has finished; a
split whose frozen-prefix activations exceed ``finetune.prefix_memory_mb`` is streamed from
shards in the git-ignored ``.graft/scratch/``, removed when the run ends.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from graft.calibration import calibrate
from graft.choices import choose_by_splits, temperature_by_splits
from graft.classifier import (
    Checkpoint,
    build_classifier,
    head_architecture_of,
    load_checkpoint,
    save_checkpoint,
)
from graft.config import FinetuneParams, load_params
from graft.data.manifest import read_manifest, usable_rows
from graft.ensemble import average_probabilities
from graft.evaluate import candidate_summary, choose_candidate
from graft.fewshot import finetune_skip_reason
from graft.files import file_sha256, write_json, write_text_atomic
from graft.finetune import (
    FinetuneResult,
    augment_transform,
    check_schedule,
    finetune,
    fingerprint,
)
from graft.live_log import write_live_log
from graft.numeric import softmax
from graft.paths import ProjectPaths
from graft.preprocessing import eval_transform


def checkpoint_dir(paths: ProjectPaths) -> Path:
    return paths.finetuned_model.parent / "checkpoints"


def scratch_dir(paths: ProjectPaths) -> Path:
    """Where streamed activations are written while fine-tuning runs (git-ignored, outside DVC's
    outputs, on the project's disk rather than a possibly memory-backed /tmp)."""
    return paths.root / ".graft" / "scratch" / "finetune"


def main(root: Path = Path(".")) -> FinetuneResult:
    paths = ProjectPaths(root)
    params = load_params(paths.params)
    settings = params.finetune
    head = load_checkpoint(paths.head_model)
    model = build_classifier(head)
    spec = head.spec
    if settings.enabled:
        check_schedule(model, settings)  # before any work: a bad schedule names its key
    skip = finetune_skip_reason(paths.manifest, params)  # few-shot: too few images to tune
    if skip:
        print(skip)
    run = settings.enabled and sum(epochs for _, epochs in settings.phases) > 0 and not skip
    if run:
        init = head.info.get("finetune_init")  # the probe fit on train: val stays unseen
        if init is not None:
            model.get_classifier().load_state_dict(init)
        manifest = read_manifest(paths.manifest)
        usable = usable_rows(manifest)
        index_of = {label: i for i, label in enumerate(spec.labels)}

        def split_of(name: str) -> tuple[list[Path], np.ndarray]:
            rows = usable[usable["split"] == name]
            labels = rows["label"].map(index_of).to_numpy(dtype=np.int64)
            return [paths.data / p for p in rows["path"]], labels

        (train_paths, train_y), (val_paths, val_y) = split_of("train"), split_of("val")
        rows = usable[usable["split"].isin(["train", "val"])]
        config_id = fingerprint(
            head=file_sha256(paths.head_model),
            images=rows[["path", "sha256", "label", "split"]].values.tolist(),
            spec={"backbone": spec.backbone, "weights": spec.weights_sha256 or spec.weights},
            invariances=list(params.data.invariances),
        )
        result = finetune(
            model,
            train_paths,
            train_y,
            val_paths,
            val_y,
            eval_transform(spec.data_config),
            spec.data_config.input_size,
            settings,
            params.features.engine,
            train_transform=train_transform(spec.data_config, settings),
            invariances=params.data.invariances,
            checkpoint_dir=checkpoint_dir(paths),
            config_id=config_id,
            on_epoch=_print_epoch,
            scratch_dir=scratch_dir(paths),
        )
        print(f"finetune: {_prefix_summary(result.prefix)}")
    else:
        head_val = float(head.info["val_accuracy"])
        result = FinetuneResult(model.state_dict(), head_val, head_val, 0, [])
    state_dict, calibration, temperature_splits = result.state_dict, None, None
    choosing = params.evaluate  # below small_val_images val images: repeated half-splits
    small = run and 0 < len(val_y) < choosing.small_val_images
    if run and settings.calibrate and len(val_y):
        val_logits = result.val_logits.float().numpy()
        if small:
            temperature_splits = temperature_by_splits(val_logits, val_y, choosing.val_splits)
        if temperature_splits is None or temperature_splits["kept"]:
            calibration = calibrate(model, val_logits, val_y)
            state_dict = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    choice = None
    candidate = "head"
    if run and len(val_y):  # head, fine-tuned or their average: the best on val
        temperature = calibration["temperature"] if calibration else 1.0
        # The head as shipped (the probe refit on train + val) is judged by its out-of-fold
        # val logits; a head without them (linear, mlp) is shipped as trained on train.
        head_logits = head.info.get("val_oof_logits", result.head_val_logits)
        probabilities = {
            "head": softmax(head_logits.float().numpy()),
            "finetuned": softmax(result.val_logits.float().numpy() / temperature),
        }
        probabilities["average"] = average_probabilities(list(probabilities.values()))
        correct = {k: p.argmax(axis=1) == val_y for k, p in probabilities.items()}
        if small:
            choice = choose_by_splits(correct, val_y, choosing.val_splits)
        else:
            choice = choose_candidate(correct)
        choice["head_scored"] = "out of fold" if "val_oof_logits" in head.info else "on val"
        candidate = choice["candidate"]
    info = {
        "best_epoch": result.best_epoch,
        "val_accuracy": result.val_accuracy,
        "head": head_architecture_of(head),
        "candidate": candidate,
    }
    save_checkpoint(paths.finetuned_model, Checkpoint(spec, "full", state_dict, info))
    tuned = [r["val_accuracy"] for r in result.history if r["epoch"] > 0]
    write_json(
        paths.metrics / "finetune.json",
        {
            "skipped": not run,
            "head_val_accuracy": result.head_val_accuracy,
            "val_accuracy": result.val_accuracy,
            "finetuned_val_accuracy": max(tuned) if tuned else None,
            "best_epoch": result.best_epoch,
            "epochs_run": max(len(result.history) - 1, 0),
            "candidate": candidate,
            "candidates": choice,
            "bn": result.bn,
            "recipe": result.recipe or None,
            "recipes": result.trials,  # each recipe's trial: val score, seconds, epochs
            "recipe_choice": result.choice,
            "stopped": result.stopped,
            "resumed_at_epoch": result.resumed_at_epoch,
            "calibration": calibration,
            "temperature_splits": temperature_splits,
            "invariances": list(params.data.invariances),
            "prefix": result.prefix or None,  # held in memory or streamed from disk shards
        },
    )
    write_text_atomic(paths.plots / "finetune_history.csv", _history_csv(result.history))
    write_live_log(paths.root / "dvclive" / "finetune", result.history)
    for leftover in checkpoint_dir(paths).glob("finetune-*.resume.pt"):
        leftover.unlink()  # the run is complete: its model is in finetuned.pt
    print(
        f"finetune: val accuracy {result.val_accuracy:.4f} at epoch {result.best_epoch} "
        f"(head alone: {result.head_val_accuracy:.4f}, recipe {result.recipe}); candidate: "
        f"{candidate}"
    )
    if choice:
        print(f"finetune: {candidate_summary(choice)}")
    if temperature_splits and temperature_splits.get("splits"):
        spread = temperature_splits
        low, high = spread["temperature_ci90"]
        print(
            f"finetune: temperature on {spread['splits']} half-splits of val: {low:.3f} to "
            f"{high:.3f} (90%), held-out val NLL {spread['heldout_nll_before']:.4f} -> "
            f"{spread['heldout_nll_after']:.4f}: "
            + ("kept" if spread["kept"] else "not kept (it does not help held-out images)")
        )
    if calibration:
        print(
            f"finetune: temperature {calibration['temperature']:.3f} fitted on val: val ECE "
            f"{calibration['val_ece_before']:.4f} -> {calibration['val_ece']:.4f}, val NLL "
            f"{calibration['val_nll_before']:.4f} -> {calibration['val_nll']:.4f}"
        )
        if calibration["bounded"]:
            print(
                f"finetune: val has {calibration['val_errors']} errors in "
                f"{calibration['val_images']} images: the temperature is bounded (likelihood "
                f"alone: {calibration['likelihood_temperature']:.3f}) so that the mean val "
                f"confidence stays at {calibration['confidence_ceiling']:.4f}, Laplace's "
                "estimate of the accuracy"
            )
    return result


def train_transform(
    data_config: dict, settings: FinetuneParams
) -> Callable[[Image.Image], torch.Tensor] | None:
    """timm's augmentation (``finetune.augment``), or None (nothing random: the frozen prefix is
    computed once). The recipes ``NAME+inv`` add a random transformation from the declared
    ``data.invariances`` (graft.finetune)."""
    if settings.augment.enabled:
        return augment_transform(data_config, settings.augment)
    return None


def _prefix_summary(prefix: dict) -> str:
    budget = f"finetune.prefix_memory_mb: {prefix['memory_budget_mb']:g}"
    largest = max((split["mb"] for split in prefix["splits"].values()), default=0.0)
    if not prefix["streamed"]:
        return f"frozen prefix held in memory (largest split {largest:.0f} MB; {budget})"
    streamed = [name for name, split in prefix["splits"].items() if split["streamed"]]
    return (
        f"frozen prefix streamed from disk shards ({'; '.join(streamed)}; {budget}): at most "
        f"{prefix['disk_mb_peak']:.1f} MB on disk, removed"
    )


def _print_epoch(record: dict, _model) -> None:
    loss = record["train_loss"]
    print(
        f"finetune {record['recipe']} epoch {record['epoch']} (phase {record['phase']}, "
        f"{record['blocks']} blocks): "
        f"train loss {loss:.4f}, val loss {record['val_loss']:.4f}, "
        f"val accuracy {record['val_accuracy']:.4f}"
        + ("" if math.isfinite(loss) else " (diverged)")
    )


def _history_csv(history: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=["epoch", "train_loss", "val_accuracy"], extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()
