"""Stage ``evaluate``: test metrics for both models, the candidate chosen on val, and the gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.choices import choose_by_splits
from graft.classifier import Checkpoint, build_classifier, build_head, load_checkpoint
from graft.config import load_params
from graft.engines import make_runner
from graft.ensemble import average_probabilities
from graft.evaluate import (
    Blessing,
    above_chance,
    bless,
    choose_candidate,
    classification_metrics,
    not_worse_than_reference,
)
from graft.features import forward_in_batches, load_feature_set
from graft.files import read_json, write_json, write_text_atomic
from graft.numeric import softmax
from graft.paths import ProjectPaths
from graft.preprocessing import eval_transform
from graft.probe import budget_rows, cv_probe, logits_in_chunks, stack_rows
from graft.report import (
    confusion_csv,
    evaluation_markdown,
    save_confusion_plot,
    save_misclassified_gallery,
    save_reliability_plot,
)
from graft.tta import group, group_probabilities, tta_summary

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "ece")


def main(root: Path = Path(".")) -> Blessing:
    paths = ProjectPaths(root)
    params = load_params(paths.params)
    head_ckpt = load_checkpoint(paths.head_model)
    labels = head_ckpt.spec.labels
    test = load_feature_set(paths.features / "test.npz", mmap=True)  # read a chunk at a time
    chunk = budget_rows(test.features, params.head.probe_max_mb)
    finetune_metrics = read_json(paths.metrics / "finetune.json")

    head = build_head(head_ckpt, test.features.shape[1])
    head_logits = logits_in_chunks(head.eval(), test.features, chunk)
    probabilities = {"head": softmax(head_logits)}
    if not finetune_metrics["skipped"]:
        model = build_classifier(load_checkpoint(paths.finetuned_model))
        input_size = head_ckpt.spec.data_config.input_size
        batch_size = params.features.batch_size
        logits = forward_in_batches(
            make_runner(
                model,
                input_size,
                batch_size,
                params.features.engine,
                run_memory_mb=params.features.run_memory_mb,
            ),
            [paths.data / p for p in test.paths],
            eval_transform(head_ckpt.spec.data_config),
            batch_size,
            "evaluate finetuned",
        )
        probabilities["finetuned"] = softmax(logits)
        probabilities["average"] = average_probabilities(list(probabilities.values()))
    results = {
        name: classification_metrics(test.labels, probs, labels)
        for name, probs in probabilities.items()
    }

    candidate = finetune_metrics["candidate"]  # chosen on val by the finetune stage
    model_path = {
        "head": paths.head_model,
        "finetuned": paths.finetuned_model,
        "average": paths.finetuned_model,  # with the head (models/head.pt): export averages them
    }[candidate]
    tta, tta_test = _test_time_augmentation(paths, params, head_ckpt, candidate)
    if tta_test is not None:  # what ships is the candidate averaged over the invariances
        tta["test_accuracy_without"] = results[candidate]["accuracy"]  # reported, never chosen on
        probabilities[candidate] = tta_test
        results[candidate] = classification_metrics(test.labels, tta_test, labels)
    chosen = probabilities[candidate]
    predicted = chosen.argmax(axis=1)
    gate = params.evaluate
    comparisons = []
    probe_pred = _probe_predictions(paths, params, head_ckpt, head_logits, test)
    if gate.vs_probe and probe_pred is not None:
        comparisons.append(
            not_worse_than_reference(test.labels, predicted, probe_pred, gate.significance)
        )
    if gate.above_chance:
        comparisons.append(above_chance(test.labels, predicted, gate.significance))
    blessing = bless(
        candidate,
        model_path.relative_to(paths.root).as_posix(),
        results[candidate],
        gate,
        comparisons,
    )
    blessing.tta = tta["transformations"] if tta and tta["kept"] else []

    write_json(paths.blessing, blessing.to_dict())
    summary = _metrics_summary(candidate, results, blessing)
    summary["tta"] = tta
    if probe_pred is not None:
        summary["probe_accuracy"] = float((probe_pred == test.labels).mean())
    write_json(paths.metrics / "eval.json", summary)
    write_json(paths.evaluation_details, results)
    write_text_atomic(
        paths.plots / "confusion.csv", confusion_csv(test.paths, test.labels, predicted, labels)
    )
    save_confusion_plot(
        results[candidate]["confusion_matrix"], labels, paths.plots / "confusion.png"
    )
    save_reliability_plot(
        results[candidate]["reliability"],
        results[candidate]["ece"],
        paths.plots / "reliability.png",
    )
    wrong = np.flatnonzero(predicted != test.labels)
    save_misclassified_gallery(
        [paths.data / test.paths[i] for i in wrong],
        [
            f"{labels[test.labels[i]]} → {labels[predicted[i]]} ({chosen[i].max():.2f})"
            for i in wrong
        ],
        paths.plots / "misclassified.png",
    )
    write_text_atomic(
        paths.evaluation_report,
        evaluation_markdown(results, finetune_metrics, blessing, len(wrong), tta),
    )
    if tta:
        print(f"evaluate: {tta_summary(tta)}")
    verdict = "BLESSED" if blessing.passed else "NOT BLESSED: " + "; ".join(blessing.reasons)
    accuracy = results[candidate]["accuracy"]
    print(f"evaluate: candidate {candidate}, test accuracy {accuracy:.4f} — {verdict}")
    return blessing


def _test_time_augmentation(
    paths: ProjectPaths, params, head_ckpt: Checkpoint, candidate: str
) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """Is the candidate more accurate on val averaged over the group of ``data.invariances``?

    The decision, and the shipped candidate's test probabilities with TTA when it is kept (else
    None). On val the head is the probe fit on train (the refit on train + val has seen val);
    below ``evaluate.small_val_images`` val images the choice is made over half-splits.
    """
    invariances = list(params.data.invariances)
    if not (params.evaluate.tta and invariances):
        return None, None
    spec = head_ckpt.spec
    input_size = spec.data_config.input_size
    names = group(invariances, square=input_size[-1] == input_size[-2])
    val = load_feature_set(paths.features / "val.npz")
    decision: dict[str, Any] = {"invariances": invariances, "transformations": names}
    if len(names) < 2 or not len(val):
        reason = "no val images" if len(names) > 1 else "rot90 needs a square input"
        return {**decision, "kept": False, "reason": reason}, None

    def members(shipped: bool) -> list[torch.nn.Module]:
        chosen = []
        if candidate in ("head", "average"):
            state = head_ckpt.state_dict if shipped else head_ckpt.info.get("finetune_init")
            state = head_ckpt.state_dict if state is None else state
            chosen.append(build_classifier(Checkpoint(spec, "head", state, head_ckpt.info)))
        if candidate in ("finetuned", "average"):
            chosen.append(build_classifier(load_checkpoint(paths.finetuned_model)))
        return chosen

    settings = params.features
    transform = eval_transform(spec.data_config)

    def over_group(image_paths: list[Path], shipped: bool) -> np.ndarray:
        return group_probabilities(
            members(shipped), image_paths, transform, names, input_size,
            settings.batch_size, settings.engine,
        )  # fmt: skip

    on_val = over_group([paths.data / p for p in val.paths], shipped=False)
    correct = {
        "without": on_val[0].argmax(axis=1) == val.labels,
        "with": on_val.mean(axis=0).argmax(axis=1) == val.labels,
    }
    gate = params.evaluate
    if len(val) < gate.small_val_images:
        choice = choose_by_splits(correct, val.labels, gate.val_splits, order=TTA_ORDER)
    else:
        choice = choose_candidate(correct, order=TTA_ORDER)
    decision.update(
        kept=choice["candidate"] == "with",
        val_accuracy_without=float(correct["without"].mean()),
        val_accuracy_with=float(correct["with"].mean()),
        choice=choice,
    )
    if not decision["kept"]:
        return decision, None
    test = load_feature_set(paths.features / "test.npz")
    return decision, over_group([paths.data / p for p in test.paths], shipped=True).mean(axis=0)


TTA_ORDER = ("without", "with")  # a tie goes to the cheaper model


def _probe_predictions(paths, params, head_ckpt, head_logits, test) -> np.ndarray | None:
    """The cross-validated logistic probe's test predictions: the head's own when the head is
    that probe, else a probe fit on the train+val features here. None in few-shot mode (its
    head is itself chosen against a regularised probe)."""
    if params.data.few_shot:
        return None
    if "probe" in head_ckpt.info:
        return head_logits.argmax(axis=1)
    train = load_feature_set(paths.features / "train.npz", mmap=True)
    val = load_feature_set(paths.features / "val.npz", mmap=True)
    chunk = budget_rows(train.features, params.head.probe_max_mb)
    probe, _ = cv_probe(
        stack_rows(train.features, val.features, chunk),
        np.concatenate([train.labels, val.labels]),
        len(head_ckpt.spec.labels),
        params.head,
    )
    return logits_in_chunks(probe, test.features, chunk).argmax(axis=1)


def _metrics_summary(candidate: str, results: dict[str, Any], blessing: Blessing) -> dict[str, Any]:
    summary: dict[str, Any] = {key: results[candidate][key] for key in SUMMARY_KEYS}
    summary["candidate"] = candidate
    summary["blessed"] = blessing.passed
    summary["accuracy_ci95_low"], summary["accuracy_ci95_high"] = results[candidate][
        "accuracy_ci95"
    ]
    summary["test_images"] = results[candidate]["n"]
    for name, metrics in results.items():
        summary[name] = {key: metrics[key] for key in SUMMARY_KEYS}
    return summary
