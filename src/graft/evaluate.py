"""Test-split metrics, the choice of candidate, and the gate that blesses it (or not)."""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def expected_calibration_error(
    probabilities: np.ndarray, y_true: np.ndarray, bins: int = 15
) -> tuple[float, list[dict[str, float]]]:
    """ECE over equal-width confidence bins, and the bins for a reliability diagram."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        members = which == b
        if not members.any():
            continue
        gap = abs(correct[members].mean() - confidence[members].mean())
        ece += members.mean() * gap
        table.append(
            {
                "confidence": float(confidence[members].mean()),
                "accuracy": float(correct[members].mean()),
                "count": int(members.sum()),
            }
        )
    return float(ece), table


def bootstrap_accuracy_interval(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy over the test images (fixed seed)."""
    if len(y_true) == 0:
        return float("nan"), float("nan")
    correct = (y_true == y_pred).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(resamples, len(correct)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion: sensible at 0% and 100% and for a handful of
    images, where the percentile bootstrap collapses to a single point."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def classification_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, labels: list[str]
) -> dict[str, Any]:
    """Accuracy with its bootstrap 95% interval, balanced accuracy, macro-F1, calibration (ECE),
    per-class P/R/F1 and the confusion matrix, from class probabilities."""
    y_pred = probabilities.argmax(axis=1)
    ece, reliability = expected_calibration_error(probabilities, y_true)
    low, high = bootstrap_accuracy_interval(y_true, y_pred)
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
        "accuracy_ci95": [low, high],
        "accuracy_ci95_wilson": list(wilson_interval(int((y_true == y_pred).sum()), len(y_true))),
        "ece": ece,
        "reliability": reliability,
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


CANDIDATES = ("head", "finetuned", "average")  # simplest first: a tie goes to the simpler


def choose_candidate(
    val_correct: dict[str, np.ndarray],
    resamples: int = 2000,
    seed: int = 0,
    order: Sequence[str] = CANDIDATES,
) -> dict[str, Any]:
    """The candidate with the best val accuracy (ties: the simpler, in ``CANDIDATES`` order),
    and how sure that is: for every other candidate, a paired bootstrap 95% interval over the
    val images of the winner's accuracy minus its own; ``within_noise`` when it reaches 0.

    Args:
        val_correct: per candidate, whether it got each val image right (same images, same
            order).
        order: the candidates, simplest first (e.g. ``("without", "with")`` for TTA).
    """
    names = [name for name in order if name in val_correct]
    accuracy = {name: float(np.mean(val_correct[name])) for name in names}
    best = max(names, key=lambda name: (accuracy[name], -names.index(name)))
    n = len(val_correct[best])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n)) if n else np.zeros((resamples, 0), int)
    intervals, within = {}, {}
    for name in names:
        if name == best:
            continue
        gain = val_correct[best].astype(float) - val_correct[name].astype(float)
        means = gain[draws].mean(axis=1) if n else np.zeros(resamples)
        low, high = np.percentile(means, [2.5, 97.5])
        intervals[name], within[name] = [float(low), float(high)], bool(low <= 0.0)
    return {
        "candidate": best,
        "val_accuracy": accuracy,
        "val_images": n,
        "difference_ci95": intervals,
        "within_noise": within,
    }


def candidate_summary(choice: dict[str, Any]) -> str:
    """One sentence on the val choice: the accuracies, and which rivals are within noise."""
    best = choice["candidate"]
    scores = ", ".join(f"{name} {acc:.4f}" for name, acc in choice["val_accuracy"].items())
    text = f"{best} chosen on {choice['val_images']} val images ({scores})"
    interval = "paired bootstrap 95% interval"
    if choice.get("splits"):  # graft.choices.choose_by_splits: a small val
        text += f", by their held-out halves in {choice['splits']} stratified half-splits"
        interval = "95% of the half-splits"
    close = [name for name, tied in choice["within_noise"].items() if tied]
    if close:
        low, high = choice["difference_ci95"][close[0]]
        text += (
            f"; within noise of {' and '.join(close)} ({interval} of the "
            f"difference to {close[0]}: {low:+.4f} to {high:+.4f})"
        )
    return text


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
    tta: list[str] = field(default_factory=list)  # test-time augmentation (graft.tta), if kept

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def not_worse_than_reference(
    y_true: np.ndarray,
    candidate_pred: np.ndarray,
    reference_pred: np.ndarray,
    significance: float,
    reference: str = "the CV probe",
) -> tuple[GateCheck, str | None]:
    """Is the candidate worse than ``reference`` on the same images beyond noise?

    The exact McNemar test: of the images exactly one of the two gets right, the candidate
    should win half if they were equally good; it fails when it wins so few that chance explains
    it with probability under ``significance`` (one-sided).
    """
    from scipy.stats import binomtest

    ours, theirs = candidate_pred == y_true, reference_pred == y_true
    wins, losses = int((ours & ~theirs).sum()), int((~ours & theirs).sum())
    p_value = binomtest(wins, wins + losses, 0.5, alternative="less").pvalue if losses else 1.0
    check = GateCheck("accuracy_vs_probe", float(ours.mean()), float(theirs.mean()), True)
    if p_value >= significance:
        return check, None
    check.passed = False
    return check, (
        f"accuracy {ours.mean():.4f} is below {reference}'s {theirs.mean():.4f} on the same "
        f"{len(y_true)} test images beyond noise: it gets {wins} images right that the probe "
        f"misses and misses {losses} that the probe gets right (exact McNemar test, p = "
        f"{p_value:.3g} < {significance}); ship the head, or fix fine-tuning"
    )


def above_chance(
    y_true: np.ndarray, y_pred: np.ndarray, significance: float
) -> tuple[GateCheck, str | None]:
    """Is the accuracy clearly above always predicting the most frequent class?

    One-sided exact binomial test of the number of correct images against that constant
    prediction's accuracy; it passes when chance explains it with probability under
    ``significance``.
    """
    from scipy.stats import binomtest

    n = len(y_true)
    chance = float(np.bincount(y_true).max() / n) if n else 1.0
    correct = int((y_pred == y_true).sum())
    p_value = binomtest(correct, n, chance, alternative="greater").pvalue if n else 1.0
    check = GateCheck("accuracy_vs_chance", correct / n if n else None, chance, True)
    if p_value < significance:
        return check, None
    check.passed = False
    return check, (
        f"accuracy {correct}/{n} is not clearly above chance ({chance:.4f}, always the most "
        f"frequent class): p = {p_value:.3g} >= {significance} (exact binomial test)"
    )


def bless(
    candidate: str,
    model: str,
    metrics: dict[str, Any],
    params: EvaluateParams,
    comparisons: list[tuple[GateCheck, str | None]] = (),
) -> Blessing:
    """Apply the value thresholds and the ``comparisons`` already made (against the probe, against
    chance); a missing or NaN metric fails closed."""
    thresholds = {"accuracy": params.min_accuracy, "macro_f1": params.min_macro_f1}
    checks, reasons = [], []
    for name, threshold in thresholds.items():
        value = metrics.get(name)
        valid = _finite(value)
        passed = valid and value >= threshold
        checks.append(GateCheck(name, float(value) if valid else None, threshold, passed))
        if not valid:
            reasons.append(f"{name} is missing or NaN: failing closed")
        elif not passed:
            reasons.append(f"{name} {value:.4f} is below the minimum {threshold:.4f}")
    for check, reason in comparisons:
        checks.append(check)
        if reason is not None:
            reasons.append(reason)
    return Blessing(not reasons, candidate, model, checks, reasons)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def change_checks(
    challenger: dict[str, Any], champion: dict[str, Any], params: EvaluateParams
) -> tuple[list[GateCheck], list[str]]:
    """The change gates: the challenger against the production model on the same test images.

    Accuracy may not fall below the champion's minus ``max_accuracy_drop``, and no class's recall
    may fall by more than ``max_class_recall_drop``. Models with different label sets cannot be
    compared, and a missing or NaN metric fails closed.
    """
    checks: list[GateCheck] = []
    reasons: list[str] = []
    if sorted(challenger.get("per_class", {})) != sorted(champion.get("per_class", {})):
        reasons.append(
            "the challenger's labels differ from the production model's, so the change gates "
            "cannot compare them; promote with --force and a --reason if the change is intended"
        )
        return checks, reasons
    ours, theirs = challenger.get("accuracy"), champion.get("accuracy")
    if not (_finite(ours) and _finite(theirs)):
        checks.append(GateCheck("accuracy_vs_production", None, math.nan, False))
        reasons.append("accuracy of the challenger or the production model is missing or NaN")
    else:
        floor = theirs - params.max_accuracy_drop
        checks.append(GateCheck("accuracy_vs_production", float(ours), floor, ours >= floor))
        if ours < floor:
            reasons.append(
                f"accuracy {ours:.4f} is below the production model's {theirs:.4f} "
                f"(allowed drop {params.max_accuracy_drop:.4f})"
            )
    for label, stats in challenger["per_class"].items():
        ours, theirs = stats.get("recall"), champion["per_class"][label].get("recall")
        name = f"recall[{label}]_vs_production"
        if not (_finite(ours) and _finite(theirs)):
            checks.append(GateCheck(name, None, math.nan, False))
            reasons.append(f"recall of class {label!r} is missing or NaN")
            continue
        floor = theirs - params.max_class_recall_drop
        checks.append(GateCheck(name, float(ours), floor, ours >= floor))
        if ours < floor:
            reasons.append(
                f"recall of class {label!r} fell from {theirs:.4f} to {ours:.4f} "
                f"(allowed drop {params.max_class_recall_drop:.4f})"
            )
    return checks, reasons
