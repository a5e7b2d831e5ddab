"""The cross-validated probe head: scikit-learn's logistic regression, its C chosen by stratified
k-fold CV over train + val, turned into the torch ``Linear`` the later stages use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from graft.config import HeadParams
from graft.head import HeadError, train_head
from graft.probe import ProbeSearch, fit_probe, out_of_fold_logits, search_c

GRID = [0.001, 0.01, 0.1, 1.0]


@pytest.fixture(scope="module")
def digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as 64-value vectors (real data), cut into train and val."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return {"train": (x[:600], y[:600]), "val": (x[600:800], y[600:800])}


def _softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits, dim=1).numpy()


def test_the_c_search_gives_scikit_learns_cross_validation_scores(digits):
    x, y = digits["train"]
    search = search_c(x, y, GRID, folds=5, seed=3)
    folds = StratifiedKFold(5, shuffle=True, random_state=3)
    expected = {
        c: cross_val_score(
            LogisticRegression(C=c, class_weight="balanced", max_iter=2000), x, y, cv=folds
        ).mean()
        for c in GRID
    }
    assert {c: mean for c, (mean, _) in search.scores.items()} == pytest.approx(expected)
    assert search.c == max(GRID, key=lambda c: expected[c])
    assert search.cv_accuracy == pytest.approx(max(expected.values()))


@pytest.mark.parametrize("standardize", [False, True])
def test_the_probe_linear_gives_scikit_learns_probabilities(digits, standardize):
    x, y = digits["train"]
    val_x = digits["val"][0]
    linear = fit_probe(x, y, 10, c=0.1, standardize=standardize)
    reference = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000)
    if standardize:
        reference = make_pipeline(StandardScaler(), reference)
    reference.fit(x, y)
    with torch.no_grad():
        ours = _softmax(linear(torch.from_numpy(val_x)))
    np.testing.assert_allclose(ours, reference.predict_proba(val_x), atol=1e-5)


def test_a_two_class_probe_gives_scikit_learns_probabilities(digits):
    x, y = digits["train"]
    pair = np.isin(y, [3, 8])
    labels = (y[pair] == 8).astype(np.int64)
    linear = fit_probe(x[pair], labels, 2, c=1.0)
    reference = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
    reference.fit(x[pair], labels)
    with torch.no_grad():
        ours = _softmax(linear(torch.from_numpy(x[pair])))
    np.testing.assert_allclose(ours, reference.predict_proba(x[pair]), atol=1e-5)


def test_the_probe_head_is_scored_on_val_as_fit_on_train_and_shipped_fit_on_both(digits):
    (train_x, train_y), (val_x, val_y) = digits["train"], digits["val"]
    params = HeadParams(kind="probe", c_grid=GRID, cv_folds=4, seed=1)
    result = train_head(train_x, train_y, val_x, val_y, 10, params)
    pool_x, pool_y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
    c = search_c(pool_x, pool_y, GRID, folds=4, seed=1).c
    assert result.search["c"] == c and result.search["folds"] == 4
    on_train = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(train_x, train_y)
    assert result.val_accuracy == pytest.approx(on_train.score(val_x, val_y))
    on_both = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(pool_x, pool_y)
    with torch.no_grad():
        shipped = result.shipped(torch.from_numpy(val_x)).argmax(1).numpy()
    np.testing.assert_array_equal(shipped, on_both.predict(val_x))
    assert result.shipped is result.refit and result.head is not result.refit
    assert isinstance(result.refit, torch.nn.Linear) and result.architecture == {"kind": "linear"}


def test_a_c_at_the_edge_of_the_grid_is_flagged(digits):
    (train_x, train_y), (val_x, val_y) = digits["train"], digits["val"]
    x, y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
    assert search_c(x, y, [1e-3, 0.1], folds=3).at_grid_edge == "top"  # too strong an L2
    assert search_c(x, y, [1e-4, 1.0, 1e4], folds=3).at_grid_edge is None
    scores = {0.1: (0.9, 0.01), 1.0: (0.8, 0.01)}
    assert ProbeSearch(0.1, 3, scores).at_grid_edge == "bottom"
    assert ProbeSearch(1.0, 3, {1.0: (0.8, 0.01)}).at_grid_edge is None


def test_out_of_fold_logits_are_scikit_learns_cross_validated_predictions(digits):
    x, y = digits["train"]
    logits = out_of_fold_logits(x, y, 10, c=0.1, folds=5, seed=3)
    expected = cross_val_predict(
        LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000, random_state=3),
        x,
        y,
        cv=StratifiedKFold(5, shuffle=True, random_state=3),
        method="predict_proba",
    )
    np.testing.assert_allclose(_softmax(torch.from_numpy(logits)), expected, atol=1e-4)
    # the val rows the finetune stage judges the shipped head by
    result = train_head(x, y, *digits["val"], 10, HeadParams(c_grid=GRID, cv_folds=3))
    assert result.val_oof_logits.shape == (200, 10)


def test_a_class_smaller_than_the_folds_lowers_their_number(digits):
    x, y = digits["train"]
    keep = np.flatnonzero(y != 0).tolist() + np.flatnonzero(y == 0)[:3].tolist()
    search = search_c(x[keep], y[keep], GRID, folds=5)
    assert search.folds == 3


def test_nan_features_stop_the_probe_with_a_clear_message(digits):
    x, y = digits["train"]
    x = x.copy()
    x[3, 5] = np.nan
    with pytest.raises(HeadError, match="NaN or infinite"):
        train_head(x, y, *digits["val"], 10, HeadParams(c_grid=GRID))
