"""Temperature scaling (Guo et al., 2017): one scalar T > 0 fitted on val logits, so that
``softmax(logits / T)`` says how often the model is right.

Dividing every logit by the same T keeps each argmax: accuracy does not move. Folded into the
classifier's last ``Linear`` (weight / T, bias / T), the checkpoint, its ONNX export and the
server all give the calibrated probabilities, with no extra operator.

When val holds (almost) no errors the log-likelihood keeps falling as T shrinks, and the fit
runs to its bound: the model would claim certainty that a few hundred images cannot show. So T
is never below the temperature at which the mean confidence on val equals Laplace's estimate
of the accuracy, ``(correct + 1) / (n + 2)`` (the rule of succession), and a fit that this
bound stopped is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from graft.evaluate import expected_calibration_error
from graft.numeric import softmax

BOUNDS = (0.05, 20.0)  # the temperatures searched; beyond them the logits are degenerate


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean cross-entropy of ``softmax(logits / temperature)`` against ``labels``."""
    from scipy.special import log_softmax

    scaled = np.asarray(logits, dtype=np.float64) / temperature
    return float(-log_softmax(scaled, axis=1)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in ``BOUNDS`` with the lowest negative log-likelihood on these (val) logits."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels)
    if not len(labels):
        raise ValueError("no labelled logits to fit a temperature on")
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=tuple(np.log(BOUNDS)),
        method="bounded",
    )
    return float(np.exp(result.x))


def mean_confidence(logits: np.ndarray, temperature: float) -> float:
    """The mean top-class probability of ``softmax(logits / temperature)``."""
    return float(softmax(np.asarray(logits, dtype=np.float64) / temperature).max(axis=1).mean())


def confidence_ceiling(logits: np.ndarray, labels: np.ndarray) -> float:
    """Laplace's estimate of the accuracy, ``(correct + 1) / (n + 2)``: the most confidence
    these labelled logits can justify (below 1 even when every one is right)."""
    correct = int((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).sum())
    return (correct + 1) / (len(labels) + 2)


def temperature_floor(logits: np.ndarray, ceiling: float) -> float:
    """The smallest T in ``BOUNDS`` whose mean confidence is at most ``ceiling``."""
    from scipy.optimize import brentq

    low, high = np.log(BOUNDS)
    excess = lambda log_t: mean_confidence(logits, float(np.exp(log_t))) - ceiling  # noqa: E731
    if excess(low) <= 0:
        return BOUNDS[0]
    if excess(high) > 0:
        return BOUNDS[1]
    return float(np.exp(brentq(excess, low, high, xtol=1e-6)))


@dataclass(frozen=True)
class TemperatureFit:
    """The temperature, and whether the confidence bound (not the likelihood) set it."""

    temperature: float
    likelihood_temperature: float  # the unbounded fit
    confidence_ceiling: float
    errors: int
    bounded: bool


def fit_bounded_temperature(logits: np.ndarray, labels: np.ndarray) -> TemperatureFit:
    """The likelihood's temperature, raised where needed so that the mean confidence on these
    logits stays at or below :func:`confidence_ceiling`."""
    likely = fit_temperature(logits, labels)
    ceiling = confidence_ceiling(logits, labels)
    floor = temperature_floor(logits, ceiling)
    errors = int((np.asarray(logits).argmax(axis=1) != np.asarray(labels)).sum())
    return TemperatureFit(max(likely, floor), likely, ceiling, errors, floor > likely)


def fold_temperature(classifier: nn.Module, temperature: float) -> None:
    """Make ``classifier`` output its logits divided by ``temperature`` (in place).

    Raises:
        ValueError: if ``temperature`` is not positive or the classifier has no ``Linear``.
    """
    if not temperature > 0:
        raise ValueError(f"a temperature must be above 0, got {temperature}")
    linears = [module for module in classifier.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(classifier).__name__} has no Linear layer to scale")
    last = linears[-1]
    with torch.no_grad():
        last.weight.div_(temperature)
        if last.bias is not None:
            last.bias.div_(temperature)


def calibrate(model: nn.Module, val_logits: np.ndarray, val_labels: np.ndarray) -> dict[str, Any]:
    """Fit a bounded temperature on the model's val logits and fold it into its classifier (in
    place).

    Returns:
        The temperature, whether the confidence bound set it (``bounded``, with the unbounded
        fit and the ceiling), and val ECE and NLL before and after it.
    """
    fit = fit_bounded_temperature(val_logits, val_labels)
    temperature = fit.temperature
    fold_temperature(model.get_classifier(), temperature)
    ece = {
        t: expected_calibration_error(softmax(val_logits / t), val_labels)[0]
        for t in (1.0, temperature)
    }
    return {
        "temperature": temperature,
        "bounded": fit.bounded,
        "likelihood_temperature": fit.likelihood_temperature,
        "confidence_ceiling": fit.confidence_ceiling,
        "val_errors": fit.errors,
        "val_images": len(val_labels),
        "val_ece_before": ece[1.0],
        "val_ece": ece[temperature],
        "val_nll_before": negative_log_likelihood(val_logits, val_labels, 1.0),
        "val_nll": negative_log_likelihood(val_logits, val_labels, temperature),
    }
