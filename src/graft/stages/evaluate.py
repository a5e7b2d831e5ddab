"""Stage ``evaluate``: test metrics for both models, the candidate chosen on val, and the gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.classifier import build_classifier, build_head, load_checkpoint
from graft.config import load_params
from graft.engines import make_runner
from graft.evaluate import Blessing, bless, classification_metrics, select_candidate
from graft.features import forward_in_batches, load_feature_set
from graft.files import read_json, write_json, write_text_atomic
from graft.numeric import softmax
from graft.paths import ProjectPaths
from graft.preprocessing import eval_transform
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
        input_size = head_ckpt.spec.data_config["input_size"]
        batch_size = params.features.batch_size
        logits = forward_in_batches(
            make_runner(model, input_size, batch_size, params.features.engine),
            [paths.data / p for p in test.paths],
            eval_transform(head_ckpt.spec.data_config),
            batch_size,
            "evaluate finetuned",
        )
        probabilities["finetuned"] = softmax(logits)
    results = {
        name: classification_metrics(test.labels, probs, labels)
        for name, probs in probabilities.items()
    }

    candidate = select_candidate(
        finetune_metrics["head_val_accuracy"],
        None if finetune_metrics["skipped"] else finetune_metrics["val_accuracy"],
    )
    model_path = paths.head_model if candidate == "head" else paths.finetuned_model
    blessing = bless(
        candidate,
        model_path.relative_to(paths.root).as_posix(),
        results[candidate],
        params.evaluate,
    )

    write_json(paths.blessing, blessing.to_dict())
    write_json(paths.metrics / "eval.json", _metrics_summary(candidate, results, blessing))
    write_json(paths.evaluation_details, results)
    chosen = probabilities[candidate]
    predicted = chosen.argmax(axis=1)
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
