"""Choices on a small val: made over repeated half-splits, with the spread, and said to be within
noise when they are."""

from __future__ import annotations

import numpy as np

from graft.calibration import confidence_ceiling, mean_confidence
from graft.choices import choose_by_splits, half_splits, temperature_by_splits
from graft.evaluate import Blessing, candidate_summary, classification_metrics
from graft.report import evaluation_markdown


def _labels(n: int, classes: int = 4) -> np.ndarray:
    return np.arange(n) % classes


def test_half_splits_are_stratified_halves_that_cover_val():
    labels = _labels(40)
    for chosen_on, held_out in half_splits(labels, 20):
        assert len(chosen_on) == len(held_out) == 20
        assert not set(chosen_on) & set(held_out)
        assert (np.bincount(labels[held_out]) == 5).all()  # every class, half of it


def test_one_image_more_on_a_tiny_val_is_within_noise_and_the_report_says_so():
    labels = _labels(24)
    head = np.ones(24, bool)
    head[:3] = False  # 21 of 24
    tuned = head.copy()
    tuned[0] = True  # 22 of 24: one image more
    choice = choose_by_splits({"head": head, "finetuned": tuned}, labels, splits=200)
    assert choice["candidate"] == "finetuned"
    assert choice["splits"] == 200 and choice["val_images"] == 24
    mean, spread = choice["heldout_accuracy"]["finetuned"]
    assert abs(mean - 22 / 24) < 0.01 and spread > 0.01  # the spread is reported
    assert choice["within_noise"] == {"head": True}
    assert 0 < choice["wins_on_half"]["head"] < 1  # on some halves the head would have won
    assert "within noise of head" in candidate_summary(choice)
    assert "half-splits" in candidate_summary(choice)


def test_a_clear_lead_is_not_noise_and_a_tie_goes_to_the_simpler():
    labels = _labels(40)
    head = np.arange(40) % 2 == 0  # 50%
    tuned = np.ones(40, bool)
    clear = choose_by_splits({"head": head, "finetuned": tuned}, labels, splits=100)
    assert clear["candidate"] == "finetuned" and clear["within_noise"] == {"head": False}
    tie = choose_by_splits({"head": tuned, "finetuned": tuned.copy()}, labels, splits=100)
    assert tie["candidate"] == "head" and tie["within_noise"] == {"finetuned": True}


def test_the_choice_depends_on_the_seed_of_the_splits_only():
    rng = np.random.default_rng(0)
    labels = _labels(30, 3)
    correct = {name: rng.random(30) < 0.8 for name in ("head", "finetuned", "average")}
    assert choose_by_splits(correct, labels, seed=3) == choose_by_splits(correct, labels, seed=3)


def test_on_a_separable_val_the_temperature_stays_bounded_on_every_half():
    labels = _labels(40)
    logits = np.full((40, 4), -4.0)
    logits[np.arange(40), labels] = 4.0  # every val image right, with margin
    spread = temperature_by_splits(logits, labels, splits=50)
    low, high = spread["temperature_ci90"]
    # each half's fit stops where its mean confidence reaches Laplace's (21/22 on 20 images):
    # never the search's bound of 0.05, where the model would claim certainty
    assert low > 0.5 and high < 2.0
    assert mean_confidence(logits[:20], low) <= confidence_ceiling(logits[:20], labels[:20]) + 1e-3
    assert spread["splits"] == 50 and spread["kept"] in (True, False)


def test_an_overconfident_model_keeps_a_temperature_that_helps_held_out_images():
    rng = np.random.default_rng(1)
    labels = _labels(60, 3)
    logits = rng.normal(size=(60, 3)) * 8.0  # large logits, often wrong: overconfident
    logits[np.arange(60), labels] += 6.0
    spread = temperature_by_splits(logits, labels, splits=50)
    assert spread["kept"] and spread["heldout_nll_after"] < spread["heldout_nll_before"]
    assert spread["temperature_median"] > 1.0


def test_the_evaluation_report_gives_the_temperature_s_spread_on_a_small_val():
    labels = _labels(40)
    logits = np.random.default_rng(2).normal(size=(40, 4)) * 6.0
    logits[np.arange(40), labels] += 3.0
    spread = temperature_by_splits(logits, labels, splits=20)
    probabilities = np.eye(4)[labels]
    results = {"head": classification_metrics(labels, probabilities, list("abcd"))}
    finetune = {"head_val_accuracy": 1.0, "temperature_splits": spread}
    report = evaluation_markdown(results, finetune, Blessing(True, "head", "models/head.pt"), 0)
    low, high = spread["temperature_ci90"]
    assert f"on 20 half-splits of val the temperature fitted on one half ranges {low:.3f}" in report
    assert ("kept." if spread["kept"] else "not applied") in report
