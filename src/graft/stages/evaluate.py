"""Stage ``evaluate``: test metrics for both models, the candidate chosen on val, and the gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.classifier import build_classifier, build_head, load_checkpoint
from graft.config import load_params
from graft.engines import make_runner
from graft.ensemble import average_probabilities
from graft.evaluate import (
    Blessing,
    above_chance,
    bless,
    classification_metrics,
    not_worse_than_reference,
)
from graft.features import forward_in_batches, load_feature_set
from graft.files import read_json, write_json, write_text_atomic
from graft.numeric import softmax
from graft.paths import ProjectPaths
from graft.preprocessing import eval_transform
from graft.probe import cv_probe
from graft.report import (
    confusion_csv,
    evaluation_markdown,
    save_confusion_plot,
    save_misclassified_gallery,
    save_reliability_plot,
)

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "ece")


def main(root: Path = Path(".")) -> Blessing:
    paths = ProjectPaths(root)
    params = load_params(paths.params)
    head_ckpt = load_checkpoint(paths.head_model)
    labels = head_ckpt.spec.labels
    test = load_feature_set(paths.features / "test.npz")
    finetune_metrics = read_json(paths.metrics / "finetune.json")

    head = build_head(head_ckpt, test.features.shape[1])
    with torch.inference_mode():
        head_logits = head(torch.from_numpy(test.features)).numpy()
    probabilities = {"head": softmax(head_logits)}
    if not finetune_metrics["skipped"]:
        model = build_classifier(load_checkpoint(paths.finetuned_model))
        input_size = head_ckpt.spec.data_config.input_size
        batch_size = params.features.batch_size
        logits = forward_in_batches(
            make_runner(model, input_size, batch_size, params.features.engine),
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

    write_json(paths.blessing, blessing.to_dict())
    summary = _metrics_summary(candidate, results, blessing)
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
        evaluation_markdown(results, finetune_metrics, blessing, len(wrong)),
    )
    verdict = "BLESSED" if blessing.passed else "NOT BLESSED: " + "; ".join(blessing.reasons)
    accuracy = results[candidate]["accuracy"]
    print(f"evaluate: candidate {candidate}, test accuracy {accuracy:.4f} — {verdict}")
    return blessing


def _probe_predictions(paths, params, head_ckpt, head_logits, test) -> np.ndarray | None:
    """The cross-validated logistic probe's test predictions: the head's own when the head is
    that probe, else a probe fit on the train+val features here. None in few-shot mode (its
    head is itself chosen against a regularised probe)."""
    if params.data.few_shot:
        return None
    if "probe" in head_ckpt.info:
        return head_logits.argmax(axis=1)
    train = load_feature_set(paths.features / "train.npz")
    val = load_feature_set(paths.features / "val.npz")
    probe, _ = cv_probe(
        np.concatenate([train.features, val.features]),
        np.concatenate([train.labels, val.labels]),
        len(head_ckpt.spec.labels),
        params.head,
    )
    with torch.inference_mode():
        return probe(torch.from_numpy(test.features)).argmax(dim=1).numpy()


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
