"""Temperature scaling (Guo et al., 2017): one scalar T > 0 fitted on val logits, so that
``softmax(logits / T)`` says how often the model is right.

Dividing every logit by the same T keeps each argmax: accuracy does not move. Folded into the
classifier's last ``Linear`` (weight / T, bias / T), the checkpoint, its ONNX export and the
server all give the calibrated probabilities, with no extra operator.
"""

from __future__ import annotations

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


def calibrate(model: nn.Module, val_logits: np.ndarray, val_labels: np.ndarray) -> dict[str, float]:
    """Fit a temperature on the model's val logits and fold it into its classifier (in place).

    Returns:
        The temperature, and val ECE and NLL before and after it.
    """
    temperature = fit_temperature(val_logits, val_labels)
    fold_temperature(model.get_classifier(), temperature)
    ece = {
        t: expected_calibration_error(softmax(val_logits / t), val_labels)[0]
        for t in (1.0, temperature)
    }
    return {
        "temperature": temperature,
        "val_ece_before": ece[1.0],
        "val_ece": ece[temperature],
        "val_nll_before": negative_log_likelihood(val_logits, val_labels, 1.0),
        "val_nll": negative_log_likelihood(val_logits, val_labels, temperature),
    }
