"""The cross-validated logistic probe: the standard linear-probe protocol (Kornblith et al., 2019).

A multinomial logistic regression on the frozen features, its L2 strength ``C`` chosen by
stratified k-fold cross-validation over train and val together, then refit with that ``C``.
scikit-learn is the implementation (``GridSearchCV`` over ``LogisticRegression``); its
coefficients become an ``nn.Linear`` over the raw features, so the probe drops into the timm
model's classifier for fine-tuning and export like any other linear head. Optional feature
standardisation is folded into that ``Linear``: ``W (x - mean) / std + b`` is ``W' x + b'``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

from graft.config import HeadParams

MAX_ITER = 2000


@dataclass(frozen=True)
class ProbeSearch:
    """The cross-validation of ``C``: mean and spread of fold accuracy per candidate."""

    c: float  # the chosen C (best mean fold accuracy; ties go to the smaller C)
    folds: int
    scores: dict[float, tuple[float, float]]  # C -> (mean, std) of fold accuracy

    @property
    def cv_accuracy(self) -> float:
        return self.scores[self.c][0]

    @property
    def cv_std(self) -> float:
        return self.scores[self.c][1]

    @property
    def at_grid_edge(self) -> str | None:
        """``"top"`` or ``"bottom"`` when the chosen C is the grid's largest or smallest: the
        best C may lie beyond it (a grid of one C has no edge to speak of)."""
        if len(self.scores) < 2:
            return None
        if self.c == max(self.scores):
            return "top"
        return "bottom" if self.c == min(self.scores) else None


def probe_pipeline(c: float, standardize: bool, seed: int = 0) -> Pipeline:
    """scikit-learn's probe: [StandardScaler ->] LogisticRegression(C, balanced class weights)."""
    steps = [("scale", StandardScaler())] if standardize else []
    steps.append(
        (
            "logistic",
            LogisticRegression(C=c, class_weight="balanced", max_iter=MAX_ITER, random_state=seed),
        )
    )
    return Pipeline(steps)


def folds_for(labels: np.ndarray, folds: int) -> int:
    """As many folds as asked, but never more than the smallest class has images."""
    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min()) if len(labels) else 0
    return max(2, min(folds, smallest))


def search_c(
    features: np.ndarray,
    labels: np.ndarray,
    c_grid: Sequence[float],
    folds: int = 5,
    standardize: bool = False,
    seed: int = 0,
) -> ProbeSearch:
    """Score every ``C`` in ``c_grid`` by stratified ``folds``-fold CV accuracy on these images.

    The folds are shuffled with ``seed``; a class with fewer images than ``folds`` lowers the
    number of folds (at least 2).
    """
    grid = sorted(float(c) for c in c_grid)
    k = folds_for(labels, folds)
    search = GridSearchCV(
        probe_pipeline(grid[0], standardize, seed),
        {"logistic__C": grid},
        scoring="accuracy",
        cv=StratifiedKFold(k, shuffle=True, random_state=seed),
        refit=False,
        n_jobs=1,
    )
    with threadpool_limits(1), warnings.catch_warnings():
        # A fold that stops at MAX_ITER is scored as it stands; the final fit reports its own.
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(features, labels)
    results = search.cv_results_
    scores = {
        float(c): (float(mean), float(std))
        for c, mean, std in zip(
            results["param_logistic__C"],
            results["mean_test_score"],
            results["std_test_score"],
            strict=True,
        )
    }
    best = max(grid, key=lambda c: (round(scores[c][0], 12), -c))  # ties: stronger L2
    return ProbeSearch(best, k, scores)


def fit_probe(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    c: float,
    standardize: bool = False,
    seed: int = 0,
) -> nn.Linear:
    """The probe fit on all these images, as an ``nn.Linear`` over the raw features.

    Standardisation (when on) is folded into the layer; with two classes scikit-learn's single
    row ``z`` becomes the logits ``[0, z]`` (the same softmax as its sigmoid).
    """
    pipeline = probe_pipeline(c, standardize, seed)
    with threadpool_limits(1):
        pipeline.fit(features, labels)
    model: LogisticRegression = pipeline.named_steps["logistic"]
    weight = model.coef_.astype(np.float64)
    bias = model.intercept_.astype(np.float64)
    if weight.shape[0] == 1:
        weight = np.vstack([np.zeros_like(weight), weight])
        bias = np.concatenate([[0.0], bias])
    if standardize:
        scaler: StandardScaler = pipeline.named_steps["scale"]
        weight = weight / scaler.scale_
        bias = bias - weight @ scaler.mean_
    present = model.classes_
    full_weight = np.zeros((num_classes, features.shape[1]))
    full_bias = np.full(num_classes, -1e4)  # a class absent here is never predicted
    full_weight[present], full_bias[present] = weight, bias
    linear = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(full_weight))
        linear.bias.copy_(torch.from_numpy(full_bias))
    return linear.eval()


def out_of_fold_logits(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    c: float,
    folds: int = 5,
    standardize: bool = False,
    seed: int = 0,
) -> np.ndarray:
    """Every image's logits from the probe fit (at ``c``) on the other folds: the same stratified
    folds :func:`search_c` scores (same ``folds`` and ``seed``), so each image is judged by a
    probe that never saw it, trained the way the shipped refit is."""
    k = folds_for(labels, folds)
    logits = np.zeros((len(labels), num_classes), dtype=np.float32)
    splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    for fit_rows, held_out in splitter.split(features, labels):
        linear = fit_probe(features[fit_rows], labels[fit_rows], num_classes, c, standardize, seed)
        with torch.no_grad():
            logits[held_out] = linear(torch.from_numpy(features[held_out])).numpy()
    return logits


def cv_probe(
    features: np.ndarray, labels: np.ndarray, num_classes: int, params: HeadParams
) -> tuple[nn.Linear, ProbeSearch]:
    """The probe ``head.*`` describes: C by cross-validation on these images, then fit on all."""
    search = search_c(
        features, labels, params.c_grid, params.cv_folds, params.standardize, params.seed
    )
    linear = fit_probe(features, labels, num_classes, search.c, params.standardize, params.seed)
    return linear, search
