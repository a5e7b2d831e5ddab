"""Test-split metrics, the choice of candidate, and the gate that blesses it (or not)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from graft.config import EvaluateParams


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class P/R/F1 and the confusion matrix."""
    indices = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=indices, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=indices, average="macro", zero_division=0)
        ),
        "n": int(len(y_true)),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=indices).tolist(),
    }


def select_candidate(head_val_accuracy: float, finetuned_val_accuracy: float | None) -> str:
    """Fine-tuned only if it beats the head on val; selection never looks at test."""
    if finetuned_val_accuracy is not None and finetuned_val_accuracy > head_val_accuracy:
        return "finetuned"
    return "head"


@dataclass
class GateCheck:
    name: str
    value: float | None
    threshold: float
    passed: bool


@dataclass
class Blessing:
    passed: bool
    candidate: str
    model: str
    checks: list[GateCheck] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bless(candidate: str, model: str, metrics: dict[str, Any], params: EvaluateParams) -> Blessing:
    """Apply the value thresholds; a missing or NaN metric fails closed."""
    thresholds = {"accuracy": params.min_accuracy, "macro_f1": params.min_macro_f1}
    checks, reasons = [], []
    for name, threshold in thresholds.items():
        value = metrics.get(name)
        valid = isinstance(value, (int, float)) and not math.isnan(value)
        passed = valid and value >= threshold
        checks.append(GateCheck(name, float(value) if valid else None, threshold, passed))
        if not valid:
            reasons.append(f"{name} is missing or NaN: failing closed")
        elif not passed:
            reasons.append(f"{name} {value:.4f} is below the minimum {threshold:.4f}")
    return Blessing(not reasons, candidate, model, checks, reasons)
