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
from graft.features import FeatureSet, load_feature_set, save_feature_set
from graft.head import HeadError, train_head
from graft.probe import (
    ProbeSearch,
    budget_rows,
    fit_probe,
    fit_probe_chunked,
    out_of_fold_logits,
    search_c,
    stratified_subsample,
)

GRID = [0.001, 0.01, 0.1, 1.0]


@pytest.fixture(scope="module")
def digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as 64-value vectors (real data), cut into train and val."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return {"train": (x[:600], y[:600]), "val": (x[600:800], y[600:800])}


def _sklearn_probe(x, y, c: float, standardize: bool, **options):
    """scikit-learn's probe, fit: [StandardScaler ->] LogisticRegression(C, balanced weights)."""
    reference = LogisticRegression(C=c, class_weight="balanced", **options)
    return (make_pipeline(StandardScaler(), reference) if standardize else reference).fit(x, y)


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
    reference = _sklearn_probe(x, y, 0.1, standardize, max_iter=2000)
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


@pytest.mark.parametrize(("standardize", "classes"), [(False, 10), (True, 10), (False, 2)])
def test_the_probe_fit_in_chunks_gives_scikit_learns_probabilities(
    digits, standardize, classes, tmp_path
):
    """Bounded memory: the gradient summed over 64-image chunks reaches scikit-learn's optimum."""
    x, y = digits["train"]
    val_x = digits["val"][0]
    if classes == 2:
        pair = np.isin(y, [3, 8])
        x, y = x[pair], (y[pair] == 8).astype(np.int64)
    memory_mapped = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.float32, x.shape)
    memory_mapped[:] = x
    linear = fit_probe_chunked(memory_mapped, y, classes, 0.1, standardize, chunk_rows=64)
    reference = _sklearn_probe(x, y, 0.1, standardize, max_iter=5000, tol=1e-8)
    with torch.no_grad():
        ours = _softmax(linear(torch.from_numpy(val_x)))
    np.testing.assert_allclose(ours, reference.predict_proba(val_x), atol=1e-3)


def test_train_val_over_the_budget_cross_validate_a_stratified_subsample(digits):
    (train_x, train_y), (val_x, val_y) = digits["train"], digits["val"]
    params = HeadParams(kind="probe", c_grid=GRID, cv_folds=4, probe_max_mb=0.1)
    rows = budget_rows(train_x, 0.1)
    assert rows == 409  # 0.1 MB of 64 float32 features
    result = train_head(train_x, train_y, val_x, val_y, 10, params)
    assert result.search["images"] == 800 and 400 <= result.search["cv_images"] <= 420
    counts = np.bincount(train_y, minlength=10) + np.bincount(val_y, minlength=10)
    sample = stratified_subsample(np.concatenate([train_y, val_y]), rows)
    np.testing.assert_allclose(
        np.bincount(np.concatenate([train_y, val_y])[sample]) / len(sample),
        counts / counts.sum(),
        atol=0.01,
    )
    roomy = train_head(
        train_x, train_y, val_x, val_y, 10, params.model_copy(update={"probe_max_mb": 512})
    )
    assert roomy.search["cv_images"] == 800  # below the budget: every image, as before
    assert result.val_accuracy == pytest.approx(roomy.val_accuracy, abs=0.02)


def test_a_memory_mapped_feature_file_trains_the_same_probe(digits, tmp_path):
    """train_head reads train.npz/val.npz memory-mapped; over the budget, train+val are stacked
    into a memory-mapped file and read a chunk at a time."""
    (train_x, train_y), (val_x, val_y) = digits["train"], digits["val"]
    for name, x, y in (("train", train_x, train_y), ("val", val_x, val_y)):
        save_feature_set(
            FeatureSet(
                x, y, np.array([f"{name}/{i}.png" for i in range(len(y))]), np.array(["0"] * len(y))
            ),
            tmp_path / f"{name}.npz",
        )
    train = load_feature_set(tmp_path / "train.npz", mmap=True)
    val = load_feature_set(tmp_path / "val.npz", mmap=True)
    assert isinstance(train.features, np.memmap)
    np.testing.assert_array_equal(train.features, train_x)
    params = HeadParams(kind="probe", c_grid=GRID, cv_folds=4, probe_max_mb=0.1)
    mapped = train_head(train.features, train.labels, val.features, val.labels, 10, params)
    loaded = train_head(train_x, train_y, val_x, val_y, 10, params)
    assert mapped.search == loaded.search
    with torch.no_grad():
        np.testing.assert_allclose(
            mapped.shipped(torch.from_numpy(val_x)),
            loaded.shipped(torch.from_numpy(val_x)),
            atol=1e-6,
        )


def test_out_of_fold_logits_over_the_budget_are_those_fit_in_memory(digits):
    """Each fold's probe fit in chunks: scikit-learn's, to its default tolerance (tol=1e-4)."""
    x, y = digits["train"]
    in_memory = out_of_fold_logits(x, y, 10, 0.1, folds=4, seed=2)
    chunked = out_of_fold_logits(x, y, 10, 0.1, folds=4, seed=2, max_mb=0.05)  # 204-row chunks
    np.testing.assert_allclose(
        _softmax(torch.from_numpy(chunked)), _softmax(torch.from_numpy(in_memory)), atol=5e-3
    )
    assert (chunked.argmax(1) == in_memory.argmax(1)).mean() >= 0.995
