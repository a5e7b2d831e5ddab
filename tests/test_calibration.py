"""Temperature scaling: the fitted temperature, and folding it into a classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graft.calibration import (
    BOUNDS,
    fit_bounded_temperature,
    fit_temperature,
    fold_temperature,
    mean_confidence,
    negative_log_likelihood,
)


def test_the_temperature_that_made_the_labels_is_found_again():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0.0, 3.0, size=(4000, 5))
    probabilities = np.exp(true_logits) / np.exp(true_logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(5, p=row) for row in probabilities])
    for temperature in (0.5, 2.5):  # the model's logits are the true ones times 1/T
        fitted = fit_temperature(true_logits * temperature, labels)
        assert fitted == pytest.approx(temperature, rel=0.08)
        nll = negative_log_likelihood(true_logits * temperature, labels, fitted)
        assert nll < negative_log_likelihood(true_logits * temperature, labels, 1.0)


def test_no_logits_give_a_clear_error():
    with pytest.raises(ValueError, match="no labelled logits"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_folding_divides_the_last_layer_s_logits_and_keeps_every_argmax():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.randn(32, 8)
    with torch.no_grad():
        before = head(x)
        fold_temperature(head, 2.0)
        after = head(x)
    assert torch.allclose(after, before / 2.0, atol=1e-6)
    assert torch.equal(after.argmax(1), before.argmax(1))
    with pytest.raises(ValueError, match="above 0"):
        fold_temperature(head, 0.0)
    with pytest.raises(ValueError, match="no Linear layer"):
        fold_temperature(torch.nn.ReLU(), 2.0)


def test_a_val_split_without_errors_gives_a_bounded_flagged_temperature():
    """Every val image right: the likelihood alone would shrink T to its bound and ship a model
    claiming certainty; the bound keeps the mean confidence at Laplace's (n + 1) / (n + 2)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=60)
    logits = rng.normal(0.0, 1.0, size=(60, 4))
    logits[np.arange(60), labels] = logits.max(axis=1) + 1.0  # the true class always on top
    fit = fit_bounded_temperature(logits, labels)
    assert fit.errors == 0 and fit.bounded
    assert fit.likelihood_temperature == pytest.approx(BOUNDS[0], rel=0.01)  # the degenerate fit
    assert fit.confidence_ceiling == pytest.approx(61 / 62)
    assert mean_confidence(logits, fit.temperature) == pytest.approx(61 / 62, abs=1e-4)
    assert mean_confidence(logits, fit.likelihood_temperature) > 0.9999  # what it would claim


def test_a_val_split_with_errors_keeps_the_likelihood_temperature():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0.0, 2.0, size=(3000, 5))
    probabilities = np.exp(true_logits) / np.exp(true_logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(5, p=row) for row in probabilities])
    fit = fit_bounded_temperature(true_logits * 0.5, labels)  # an underconfident model
    assert not fit.bounded and fit.errors > 100
    assert fit.temperature == fit.likelihood_temperature == pytest.approx(0.5, rel=0.08)
