"""Choices made on val that hold when val is small: repeated stratified half-splits.

On a val split of a few dozen images one image is several points, and a choice made on it
(head, fine-tuned model or their average; the temperature) is mostly noise. Below
``evaluate.small_val_images`` the choice is made over many random stratified halves of val
instead: each candidate is scored on the held-out half of every split, and the report gives the
mean and spread of those scores, how often each candidate wins on the other half, and whether
the winner's lead over each rival is within noise (the 2.5-97.5 percentiles of the per-split
differences reach 0). A half-split mean varies as much as the full val mean would between two
val draws of the same size (the finite-population correction of sampling half without
replacement), so that spread is the noise of the val figures.

What is already cross-validated is used as such: the head (the probe) is scored on its
out-of-fold logits over train + val (:func:`graft.probe.out_of_fold_logits`), so the head and
the average are judged as shipped, with the probe refit on train + val. Re-fine-tuning per
fold would be the full answer for the fine-tuned model, and costs k fine-tunings: it is scored
on val, where it was never trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit

from graft.calibration import fit_bounded_temperature, negative_log_likelihood
from graft.evaluate import CANDIDATES


def half_splits(
    labels: np.ndarray, splits: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``splits`` random (chosen-on, held-out) halves of these images, stratified by label when
    every class has two images or more (else plain random halves)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels) if len(labels) else np.zeros(0, int)
    stratify = len(labels) >= 4 and counts[counts > 0].min() >= 2
    splitter_class = StratifiedShuffleSplit if stratify else ShuffleSplit
    splitter = splitter_class(n_splits=splits, test_size=0.5, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


def _best(names: list[str], scores: dict[str, float]) -> str:
    """The highest score; a tie goes to the simpler (earlier in ``names``)."""
    return max(names, key=lambda name: (round(scores[name], 12), -names.index(name)))


def choose_by_splits(
    val_correct: dict[str, np.ndarray],
    labels: np.ndarray,
    splits: int = 200,
    seed: int = 0,
    order: Sequence[str] = CANDIDATES,
) -> dict[str, Any]:
    """The candidate with the best mean held-out-half accuracy over ``splits`` stratified
    half-splits of val (ties: the simpler, earlier in ``order``), with the spread.

    Returns the keys of :func:`graft.evaluate.choose_candidate` (``candidate``,
    ``val_accuracy``, ``val_images``, ``difference_ci95``, ``within_noise``) and
    ``heldout_accuracy`` (mean, std per candidate), ``wins_on_half`` (the share of splits on
    which each candidate would be chosen on one half), ``method`` and ``splits``.
    """
    names = [name for name in order if name in val_correct]
    correct = {name: np.asarray(val_correct[name], dtype=float) for name in names}
    n = len(labels)
    held: dict[str, list[float]] = {name: [] for name in names}
    wins = dict.fromkeys(names, 0)
    pairs = half_splits(labels, splits, seed) if n >= 2 else []
    for chosen_on, held_out in pairs:
        wins[_best(names, {name: correct[name][chosen_on].mean() for name in names})] += 1
        for name in names:
            held[name].append(float(correct[name][held_out].mean()))
    if not pairs:  # one image or none: nothing to split
        held = {name: [float(correct[name].mean()) if n else 0.0] for name in names}
    mean = {name: float(np.mean(held[name])) for name in names}
    best = _best(names, mean)
    intervals, within = {}, {}
    for name in names:
        if name == best:
            continue
        gain = np.asarray(held[best]) - np.asarray(held[name])
        low, high = np.percentile(gain, [2.5, 97.5])
        intervals[name], within[name] = [float(low), float(high)], bool(low <= 0.0)
    return {
        "candidate": best,
        "method": "repeated stratified half-splits of val",
        "splits": len(pairs),
        "val_accuracy": {name: float(correct[name].mean()) if n else 0.0 for name in names},
        "val_images": n,
        "heldout_accuracy": {name: [mean[name], float(np.std(held[name]))] for name in names},
        "wins_on_half": {name: wins[name] / max(len(pairs), 1) for name in names},
        "difference_ci95": intervals,
        "within_noise": within,
    }


def temperature_by_splits(
    logits: np.ndarray, labels: np.ndarray, splits: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Does a temperature fitted on one half of val make the other half's probabilities better?

    On each of ``splits`` stratified half-splits the bounded temperature
    (:func:`graft.calibration.fit_bounded_temperature`) is fitted on one half and the other
    half's negative log-likelihood compared with and without it. ``kept``: it lowers the
    held-out NLL on average (the temperature then shipped is the one fitted on all of val);
    ``temperature_ci90`` is the spread of the half fits.
    """
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    temperatures, before, after = [], [], []
    for fitted_on, held_out in half_splits(labels, splits, seed) if len(labels) >= 2 else []:
        temperature = fit_bounded_temperature(logits[fitted_on], labels[fitted_on]).temperature
        temperatures.append(temperature)
        before.append(negative_log_likelihood(logits[held_out], labels[held_out], 1.0))
        after.append(negative_log_likelihood(logits[held_out], labels[held_out], temperature))
    if not temperatures:
        return {"splits": 0, "kept": True, "reason": "too few val images to split"}
    low, median, high = np.percentile(temperatures, [5, 50, 95])
    gain = float(np.mean(before) - np.mean(after))
    return {
        "splits": len(temperatures),
        "temperature_median": float(median),
        "temperature_ci90": [float(low), float(high)],
        "heldout_nll_before": float(np.mean(before)),
        "heldout_nll_after": float(np.mean(after)),
        "helps_share": float(np.mean(np.asarray(after) < np.asarray(before))),
        "kept": gain > 0.0,
    }
