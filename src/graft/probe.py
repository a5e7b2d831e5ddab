"""The cross-validated logistic probe: the standard linear-probe protocol (Kornblith et al., 2019).

A multinomial logistic regression on the frozen features, its L2 strength ``C`` chosen by
stratified k-fold cross-validation over train and val together, then refit with that ``C``.
scikit-learn is the implementation (``GridSearchCV`` over ``LogisticRegression``); its
coefficients become an ``nn.Linear`` over the raw features, so the probe drops into the timm
model's classifier for fine-tuning and export like any other linear head. Optional feature
standardisation is folded into that ``Linear``: ``W (x - mean) / std + b`` is ``W' x + b'``.

Bounded memory: a train+val matrix over ``head.probe_max_mb`` has ``C`` cross-validated on a
stratified subsample of that size, and the probes fit on every image (the refit, the fit on
train, the out-of-fold fits) by :func:`fit_probe_chunked`: the same objective, its gradient summed
over chunks of that size, so no copy of the whole matrix is made; below the budget nothing
changes.
"""

from __future__ import annotations

import tempfile
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
    images: int = 0  # the images cross-validated

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
    return ProbeSearch(best, k, scores, len(labels))


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


def budget_rows(features: np.ndarray, max_mb: float) -> int:
    """Rows of ``features`` (as float32) that fit ``max_mb`` (at least one)."""
    return max(1, int(max_mb * 2**20) // (4 * max(features.shape[1], 1)))


def stratified_subsample(labels: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``rows`` images (all when fewer), every class in proportion and at least
    as many as it has up to the CV's needs (a class of few images is kept whole)."""
    if len(labels) <= rows:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = max(min(len(members), 10), round(rows * len(members) / len(labels)))
        chosen.append(rng.choice(members, size=min(take, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def stack_rows(first: np.ndarray, second: np.ndarray, chunk_rows: int) -> np.ndarray:
    """``first`` over ``second``: in memory when they fit ``chunk_rows``, else copied chunk by
    chunk into a memory-mapped temporary file (the probe then reads it a chunk at a time)."""
    rows = len(first) + len(second)
    if rows <= chunk_rows:
        return np.concatenate([first, second])
    stacked = np.memmap(tempfile.TemporaryFile(), np.float32, "w+", shape=(rows, first.shape[1]))
    for offset, source in ((0, first), (len(first), second)):
        for i in range(0, len(source), chunk_rows):
            block = source[i : i + chunk_rows]
            stacked[offset + i : offset + i + len(block)] = block
    return stacked


def logits_in_chunks(module: nn.Module, features: np.ndarray, chunk_rows: int) -> np.ndarray:
    """``module`` over ``features`` (maybe memory-mapped) ``chunk_rows`` at a time, as float32."""
    outputs = [np.zeros((0, module(torch.zeros(1, features.shape[1])).shape[1]), np.float32)]
    with torch.no_grad():
        for i in range(0, len(features), chunk_rows):
            chunk = torch.from_numpy(np.array(features[i : i + chunk_rows], np.float32))
            outputs.append(module(chunk).float().numpy())
    return np.concatenate(outputs)


def fit_probe_chunked(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    c: float,
    standardize: bool = False,
    chunk_rows: int = 65536,
    max_iter: int = 500,
    *,
    rows: np.ndarray | None = None,
) -> nn.Linear:
    """:func:`fit_probe`'s model on a matrix too large to copy: features may be memory-mapped.

    The same objective as scikit-learn's (multinomial, or binary with two classes; balanced class
    weights; ``0.5 |W|^2 + C * sum of weighted losses``, divided by ``C n``), minimised by L-BFGS
    with its gradient summed over ``chunk_rows`` images at a time in float64: the result matches
    :func:`fit_probe` to the solvers' tolerance, and the memory is one chunk. ``rows`` (sorted
    indices into ``features`` and ``labels``): fit those images only (a CV fold), None: all.
    """
    rows = np.arange(len(labels)) if rows is None else np.asarray(rows)
    labels = np.asarray(labels)[rows]
    n, dim = len(rows), features.shape[1]
    present, index = np.unique(labels, return_inverse=True)
    counts = np.bincount(index)
    class_weight = torch.from_numpy(n / (len(present) * counts)).double()
    chunks = [(start, min(start + chunk_rows, n)) for start in range(0, n, chunk_rows)]
    contiguous = bool(n) and rows[-1] - rows[0] == n - 1

    def read(start: int, stop: int) -> np.ndarray:  # a chunk of the selected rows
        if contiguous:
            return features[rows[0] + start : rows[0] + stop]
        return features[rows[start:stop]]

    mean, scale = np.zeros(dim), np.ones(dim)
    if standardize:  # StandardScaler's statistics, streamed
        scaler = StandardScaler()
        for start, stop in chunks:
            scaler.partial_fit(read(start, stop))
        mean, scale = scaler.mean_, scaler.scale_
    outputs = 1 if len(present) == 2 else len(present)
    weight = torch.zeros(outputs, dim, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(outputs, dtype=torch.float64, requires_grad=True)
    mean_t, scale_t = torch.from_numpy(mean).double(), torch.from_numpy(scale).double()
    target = torch.from_numpy(index).long()

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        total = (weight**2).sum() / (2 * c * n)
        total.backward()
        value = float(total.detach())
        for start, stop in chunks:
            x = (torch.from_numpy(np.array(read(start, stop), np.float64)) - mean_t) / scale_t
            z = x @ weight.T + bias
            if outputs == 1:
                z = torch.cat([torch.zeros_like(z), z], dim=1)
            y = target[start:stop]
            loss = (class_weight[y] * nn.functional.cross_entropy(z, y, reduction="none")).sum() / n
            loss.backward()
            value += float(loss.detach())
        return torch.tensor(value)

    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    with threadpool_limits(1):
        optimizer.step(objective)
    w = weight.detach().numpy()
    b = bias.detach().numpy()
    if outputs == 1:
        w, b = np.vstack([np.zeros_like(w), w]), np.concatenate([[0.0], b])
    w = w / scale
    b = b - w @ mean
    full_weight = np.zeros((num_classes, dim))
    full_bias = np.full(num_classes, -1e4)  # a class absent here is never predicted
    full_weight[present], full_bias[present] = w, b
    linear = nn.Linear(dim, num_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(full_weight))
        linear.bias.copy_(torch.from_numpy(full_bias))
    return linear.eval()


def fit_within(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    c: float,
    params: HeadParams,
) -> nn.Linear:
    """:func:`fit_probe` below ``params.probe_max_mb`` of features, :func:`fit_probe_chunked`
    above it (chunks of that size)."""
    rows = budget_rows(features, params.probe_max_mb)
    if len(features) <= rows:
        return fit_probe(features, labels, num_classes, c, params.standardize, params.seed)
    return fit_probe_chunked(features, labels, num_classes, c, params.standardize, rows)


def out_of_fold_logits(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    c: float,
    folds: int = 5,
    standardize: bool = False,
    seed: int = 0,
    max_mb: float | None = None,
) -> np.ndarray:
    """Every image's logits from the probe fit (at ``c``) on the other folds: the same stratified
    folds :func:`search_c` scores (same ``folds`` and ``seed``), so each image is judged by a
    probe that never saw it, trained the way the shipped refit is. Over ``max_mb`` of features,
    each fold's probe is fit in chunks (:func:`fit_probe_chunked`)."""
    k = folds_for(labels, folds)
    logits = np.zeros((len(labels), num_classes), dtype=np.float32)
    splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    chunk = budget_rows(features, max_mb) if max_mb else len(labels)
    for fit_rows, held_out in splitter.split(np.zeros(len(labels)), labels):
        if len(labels) <= chunk:
            linear = fit_probe(
                features[fit_rows], labels[fit_rows], num_classes, c, standardize, seed
            )
        else:
            linear = fit_probe_chunked(
                features, labels, num_classes, c, standardize, chunk, rows=fit_rows
            )
        for i in range(0, len(held_out), chunk):
            rows = held_out[i : i + chunk]
            logits[rows] = logits_in_chunks(linear, features[rows], chunk)
    return logits


def cv_probe(
    features: np.ndarray, labels: np.ndarray, num_classes: int, params: HeadParams
) -> tuple[nn.Linear, ProbeSearch]:
    """The probe ``head.*`` describes: C by cross-validation on these images (a stratified
    subsample of ``head.probe_max_mb`` when they are more), then fit on all."""
    sample = stratified_subsample(labels, budget_rows(features, params.probe_max_mb), params.seed)
    cv_x, cv_y = (
        (features, labels) if len(sample) == len(labels) else (features[sample], labels[sample])
    )
    search = search_c(cv_x, cv_y, params.c_grid, params.cv_folds, params.standardize, params.seed)
    linear = fit_within(features, labels, num_classes, search.c, params)
    return linear, search
