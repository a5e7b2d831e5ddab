"""Temperature scaling: the fitted temperature, and folding it into a classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graft.calibration import fit_temperature, fold_temperature, negative_log_likelihood


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
