"""The metrics and the gate, on numbers whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graft.config import EvaluateParams
from graft.evaluate import (
    above_chance,
    bless,
    bootstrap_accuracy_interval,
    candidate_summary,
    change_checks,
    choose_candidate,
    classification_metrics,
    expected_calibration_error,
    not_worse_than_reference,
    wilson_interval,
)


def one_hot(indices, classes=3, confidence=1.0):
    probabilities = np.full((len(indices), classes), (1 - confidence) / (classes - 1))
    probabilities[np.arange(len(indices)), indices] = confidence
    return probabilities


def test_confident_and_right_is_perfectly_calibrated():
    y = np.array([0, 1, 2, 1])
    ece, bins = expected_calibration_error(one_hot(y), y)
    assert ece == pytest.approx(0.0)
    assert sum(row["count"] for row in bins) == 4


def test_confident_and_wrong_has_an_ece_equal_to_its_confidence():
    y = np.array([0, 0, 0, 0])
    ece, _ = expected_calibration_error(one_hot(np.array([1, 1, 1, 1]), confidence=0.9), y)
    assert ece == pytest.approx(0.9)


def test_bootstrap_interval_brackets_accuracy_and_narrows_with_more_images():
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 2000):
        y = rng.integers(0, 3, n)
        y_pred = np.where(rng.random(n) < 0.8, y, (y + 1) % 3)
        low, high = bootstrap_accuracy_interval(y, y_pred)
        assert low <= (y == y_pred).mean() <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 3


def test_metrics_from_probabilities_match_the_confusion_matrix():
    y = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])
    metrics = classification_metrics(y, one_hot(predicted, confidence=0.8), ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics["per_class"]["b"]["recall"] == 1.0
    assert metrics["per_class"]["b"]["precision"] == pytest.approx(2 / 3)


def test_the_candidate_is_chosen_on_val_and_ties_keep_the_simpler():
    right = np.ones(100, dtype=bool)
    some_wrong = right.copy()
    some_wrong[:5] = False
    assert choose_candidate({"head": some_wrong, "finetuned": right})["candidate"] == "finetuned"
    tie = choose_candidate({"head": right, "finetuned": right, "average": right})
    assert tie["candidate"] == "head"
    assert choose_candidate({"head": right})["candidate"] == "head"


def test_a_one_image_lead_on_a_tiny_val_is_said_to_be_within_noise():
    """49 val images: one image is 2 points, and no evidence."""
    head, finetuned = np.ones(49, dtype=bool), np.ones(49, dtype=bool)
    head[:2], finetuned[:1] = False, False
    choice = choose_candidate({"head": head, "finetuned": finetuned})
    assert choice["candidate"] == "finetuned" and choice["val_images"] == 49
    assert choice["within_noise"] == {"head": True}
    low, high = choice["difference_ci95"]["head"]
    assert low <= 0 < high
    assert "within noise of head" in candidate_summary(choice)
    # a lead of 30 images in 200 is not noise
    head, finetuned = np.ones(200, dtype=bool), np.ones(200, dtype=bool)
    head[:40], finetuned[:10] = False, False
    clear = choose_candidate({"head": head, "finetuned": finetuned})
    assert clear["within_noise"] == {"head": False}
    assert "within noise" not in candidate_summary(clear)


@pytest.mark.parametrize("bad", [float("nan"), None])
def test_a_missing_or_nan_metric_fails_closed(bad):
    metrics = {"accuracy": 0.99, "macro_f1": bad}
    blessing = bless("head", "models/head.pt", metrics, EvaluateParams(min_accuracy=0.5))
    assert blessing.passed is False
    assert any("macro_f1 is missing or NaN" in reason for reason in blessing.reasons)


def test_the_gate_passes_only_at_or_above_every_threshold():
    params = EvaluateParams(min_accuracy=0.9, min_macro_f1=0.8)
    assert bless("head", "m", {"accuracy": 0.9, "macro_f1": 0.8}, params).passed
    refused = bless("head", "m", {"accuracy": 0.89, "macro_f1": 0.95}, params)
    assert not refused.passed
    assert refused.reasons == ["accuracy 0.8900 is below the minimum 0.9000"]
    assert not math.isnan(refused.checks[0].value)


def _predictions_with(right: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Predictions that are right exactly where ``right`` is (wrong: the next class)."""
    return np.where(right, y, (y + 1) % 10)


def test_a_candidate_worse_than_the_probe_beyond_noise_is_refused():
    y = np.arange(500) % 10
    probe = _predictions_with(np.arange(500) >= 40, y)  # 460 right
    # 20 images the candidate gets right and the probe misses, 40 the other way round:
    # 0.88 against 0.92; 20 or fewer heads in 60 fair coin flips: p = 0.007
    right = (np.arange(500) >= 40) & (np.arange(500) < 460) | (np.arange(500) < 20)
    candidate = _predictions_with(right, y)
    check, reason = not_worse_than_reference(y, candidate, probe, 0.05)
    assert not check.passed and check.value == 0.88 and check.threshold == 0.92
    assert "20 images right that the probe misses and misses 40" in reason and "McNemar" in reason
    blessing = bless(
        "finetuned", "m", {"accuracy": 0.88, "macro_f1": 0.88}, EvaluateParams(), [(check, reason)]
    )
    assert not blessing.passed and blessing.reasons == [reason]


def test_a_candidate_a_little_below_the_probe_is_within_noise():
    y = np.arange(500) % 10
    probe = _predictions_with(np.arange(500) >= 40, y)
    right = (np.arange(500) >= 40) & (np.arange(500) < 455) | (np.arange(500) < 35)  # 30 vs 45
    check, reason = not_worse_than_reference(y, _predictions_with(right, y), probe, 0.05)
    assert check.passed and reason is None and check.value < check.threshold
    same, none = not_worse_than_reference(y, probe, probe, 0.05)
    assert same.passed and none is None


def test_a_candidate_at_chance_is_refused_and_one_clearly_above_passes():
    y = np.array([0] * 30 + [1] * 10 + [2] * 10)  # always "0" scores 0.6
    at_chance = np.zeros(50, dtype=int)
    check, reason = above_chance(y, at_chance, 0.05)
    assert not check.passed and check.threshold == 0.6 and "not clearly above chance" in reason
    better = y.copy()
    better[:5] = 1  # 45 of 50: p(>= 45 | 0.6) is tiny
    check, reason = above_chance(y, better, 0.05)
    assert check.passed and reason is None


def test_the_default_gate_has_no_absolute_floor():
    params = EvaluateParams()
    assert params.min_accuracy == 0.0 and params.vs_probe and params.above_chance
    assert bless("head", "m", {"accuracy": 0.3, "macro_f1": 0.3}, params).passed


def _with_recalls(accuracy, recalls):
    return {"accuracy": accuracy, "per_class": {k: {"recall": v} for k, v in recalls.items()}}


def test_change_gates_pass_an_equal_or_better_challenger():
    champion = _with_recalls(0.90, {"a": 0.9, "b": 0.9})
    checks, reasons = change_checks(
        _with_recalls(0.92, {"a": 0.95, "b": 0.89}), champion, EvaluateParams()
    )
    assert reasons == [] and all(check.passed for check in checks)
    assert [check.name for check in checks] == [
        "accuracy_vs_production",
        "recall[a]_vs_production",
        "recall[b]_vs_production",
    ]


def test_change_gates_refuse_a_lower_accuracy_or_a_class_that_got_much_worse():
    champion = _with_recalls(0.90, {"a": 0.9, "b": 0.9})
    _, reasons = change_checks(
        _with_recalls(0.89, {"a": 0.98, "b": 0.80}),
        champion,
        EvaluateParams(max_accuracy_drop=0.0, max_class_recall_drop=0.05),
    )
    assert any("below the production model's 0.9000" in reason for reason in reasons)
    assert any("recall of class 'b' fell from 0.9000 to 0.8000" in reason for reason in reasons)
    _, reasons = change_checks(
        _with_recalls(0.89, {"a": 0.9, "b": 0.88}),
        champion,
        EvaluateParams(max_accuracy_drop=0.02, max_class_recall_drop=0.05),
    )
    assert reasons == []  # within both margins


def test_change_gates_fail_closed_on_nan_and_on_different_labels():
    champion = _with_recalls(0.90, {"a": 0.9, "b": 0.9})
    checks, reasons = change_checks(
        _with_recalls(math.nan, {"a": 0.9, "b": math.nan}), champion, EvaluateParams()
    )
    assert not any(check.passed for check in checks if check.value is None)
    assert "missing or NaN" in reasons[0] and "class 'b' is missing or NaN" in reasons[1]
    _, reasons = change_checks(
        _with_recalls(0.99, {"a": 1.0, "c": 1.0}), champion, EvaluateParams()
    )
    assert len(reasons) == 1 and "labels differ" in reasons[0] and "--force" in reasons[0]


def test_wilson_interval_stays_honest_where_the_bootstrap_collapses():
    y = np.zeros(6, dtype=int)
    assert bootstrap_accuracy_interval(y, y) == (1.0, 1.0)  # six right answers: "certain"
    low, high = wilson_interval(6, 6)
    assert high == 1.0 and 0.5 < low < 0.65  # six right answers prove little
    low, high = wilson_interval(0, 6)
    assert low == 0.0 and 0.35 < high < 0.5
    low, high = wilson_interval(900, 1000)
    assert low < 0.9 < high and high - low < 0.04


def test_the_report_warns_when_the_test_set_is_small():
    from graft.report import evaluation_markdown

    y = np.array([0, 1, 2, 0, 1, 2])
    results = {"head": classification_metrics(y, one_hot(y), ["a", "b", "c"])}
    blessing = bless("head", "models/head.pt", results["head"], EvaluateParams())
    finetune = {"skipped": True, "head_val_accuracy": 1.0, "val_accuracy": 1.0}
    report = evaluation_markdown(results, finetune, blessing, 0)
    assert "**Only 6 test images.**" in report and "0.61–1.00" in report
