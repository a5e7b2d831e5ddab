"""Few-shot heads: cosine class prototypes or a strongly regularised probe, chosen on held-out data.

With 1-5 images per class, a head trained by gradient descent over-fits and fine-tuning has
nothing to learn from. Two heads that need no tuning compete instead, on L2-normalised
features: the **prototype** head (each class's mean direction; an image goes to the class of
the most similar mean, by cosine) and the **probe** (multinomial logistic regression with a
strong L2 penalty, ``fewshot.probe_c``). Whichever scores better on a held-out slice wins: val
when every class has ``fewshot.min_val_per_class`` val images, otherwise leave-one-out over
train and val together (the winner is then fit on both). A tie goes to the prototypes, which
have nothing to over-fit.

Both are a ``Linear`` layer on L2-normalised features (head kind ``l2_linear``): prototypes are
the rows of the weight matrix (times a temperature, the ``scale``, fitted on the held-out
cosines), the probe's coefficients are the weights. So the chosen head travels in the ordinary
checkpoint format and exports to ONNX like any other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, LeaveOneOut
from threadpoolctl import threadpool_limits

from graft.config import FewShotParams, Params
from graft.data.manifest import read_manifest, usable_rows
from graft.head import HeadResult, l2_linear_head

HEAD_KIND = "l2_linear"
SCALES = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0)  # prototype temperatures tried
MAX_LEAVE_ONE_OUT = 200  # more images than this: 5-fold cross-validation instead
_ABSENT = -1e4  # logit bias of a class without any training image (never predicted)


def l2_normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


@dataclass
class LinearWeights:
    """Weights of the ``Linear`` of an ``l2_linear`` head: logits = x_unit @ weight.T + bias."""

    weight: np.ndarray  # (classes, features)
    bias: np.ndarray  # (classes,)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return l2_normalise(features) @ self.weight.T + self.bias


def fit_prototypes(
    features: np.ndarray, labels: np.ndarray, num_classes: int, scale: float = 10.0
) -> LinearWeights:
    """Nearest class mean by cosine: each class's mean unit vector, itself made unit length."""
    unit = l2_normalise(features)
    weight = np.zeros((num_classes, unit.shape[1]), dtype=np.float64)
    bias = np.zeros(num_classes, dtype=np.float64)
    for label in range(num_classes):
        members = unit[labels == label]
        if len(members):
            weight[label] = members.mean(axis=0)
        else:
            bias[label] = _ABSENT
    return LinearWeights(scale * l2_normalise(weight), bias)


def fit_probe(
    features: np.ndarray, labels: np.ndarray, num_classes: int, c: float, seed: int = 0
) -> LinearWeights:
    """Multinomial logistic regression with L2 strength 1/c on the unit feature vectors."""
    present = np.unique(labels)
    # Balanced class weights: a class left with fewer images (leave-one-out, a small class) is
    # not out-voted by the intercepts, as with the gradient-trained head (graft.head).
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
    with threadpool_limits(1):  # small matrices: BLAS threads only contend (20x slower, measured)
        model.fit(l2_normalise(features), labels)
    coef, intercept = model.coef_, model.intercept_
    if len(present) == 2:  # scikit-learn keeps one row for two classes: sigmoid = softmax([0, z])
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    weight = np.zeros((num_classes, features.shape[1]), dtype=np.float64)
    bias = np.full(num_classes, _ABSENT, dtype=np.float64)
    weight[present], bias[present] = coef, intercept
    return LinearWeights(weight, bias)


@dataclass
class FewShotChoice:
    """Which head won on the held-out slice, and by how much."""

    winner: str  # "prototype" or "probe"
    method: str  # "val" or "leave-one-out" or "5-fold"
    held_out_images: int
    prototype_accuracy: float
    probe_accuracy: float
    scale: float
    probe_c: float
    fit_on: str  # "train" or "train+val"


def choose_fewshot_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    params: FewShotParams,
) -> tuple[LinearWeights, FewShotChoice]:
    """Score both heads on held-out data and fit the winner (ties: the prototypes)."""
    val_counts = np.bincount(val_y, minlength=num_classes) if len(val_y) else np.zeros(1)
    if val_counts.min() >= params.min_val_per_class:
        method, fit_x, fit_y = "val", train_x, train_y
        folds = [(np.arange(len(train_y)), np.arange(len(train_y), len(train_y) + len(val_y)))]
        pool_x, pool_y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
    else:
        pool_x, pool_y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
        fit_x, fit_y = pool_x, pool_y
        if len(pool_y) <= MAX_LEAVE_ONE_OUT:
            method, splitter = "leave-one-out", LeaveOneOut()
        else:
            method, splitter = "5-fold", KFold(5, shuffle=True, random_state=params.seed)
        folds = list(splitter.split(pool_x))
    cosines, truth, probe_hits = [], [], []
    for fit_index, held_index in folds:
        x, y = pool_x[fit_index], pool_y[fit_index]
        held_x, held_y = pool_x[held_index], pool_y[held_index]
        cosines.append(fit_prototypes(x, y, num_classes, scale=1.0).logits(held_x))
        truth.append(held_y)
        if len(np.unique(y)) >= 2:
            probe = fit_probe(x, y, num_classes, params.probe_c, params.seed)
            probe_hits.append(probe.logits(held_x).argmax(axis=1) == held_y)
        else:
            probe_hits.append(np.zeros(len(held_y), dtype=bool))
    cosine, y_held = np.concatenate(cosines), np.concatenate(truth)
    prototype_accuracy = float((cosine.argmax(axis=1) == y_held).mean())
    probe_accuracy = float(np.concatenate(probe_hits).mean())
    scale = _fit_scale(cosine, y_held)
    winner = "prototype" if prototype_accuracy >= probe_accuracy else "probe"
    if winner == "prototype":
        weights = fit_prototypes(fit_x, fit_y, num_classes, scale)
    else:
        weights = fit_probe(fit_x, fit_y, num_classes, params.probe_c, params.seed)
    choice = FewShotChoice(
        winner=winner,
        method=method,
        held_out_images=len(y_held),
        prototype_accuracy=prototype_accuracy,
        probe_accuracy=probe_accuracy,
        scale=scale,
        probe_c=params.probe_c,
        fit_on="train" if method == "val" else "train+val",
    )
    return weights, choice


def _fit_scale(cosine: np.ndarray, labels: np.ndarray) -> float:
    """The prototype temperature with the lowest held-out log-loss (calibrated probabilities)."""
    usable = cosine[np.arange(len(labels)), labels] > _ABSENT / 2  # its class had a prototype
    if not usable.any():
        return 10.0
    cosine, labels = cosine[usable], labels[usable]

    def log_loss(scale: float) -> float:
        logits = scale * cosine
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return float(-log_probs[np.arange(len(labels)), labels].mean())

    return min(SCALES, key=log_loss)


def train_fewshot_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    params: FewShotParams,
) -> HeadResult:
    """The few-shot counterpart of :func:`graft.head.train_head` (same result type).

    ``val_accuracy`` is the winner's held-out accuracy (on val, or leave-one-out); the
    architecture records the choice, so it travels in the checkpoint's ``info["head"]``.
    """
    weights, choice = choose_fewshot_head(train_x, train_y, val_x, val_y, num_classes, params)
    head = l2_linear_head(train_x.shape[1], num_classes)
    with torch.no_grad():
        head[1].weight.copy_(torch.from_numpy(weights.weight))
        head[1].bias.copy_(torch.from_numpy(weights.bias))
    head.eval()
    val_accuracy = (
        choice.prototype_accuracy if choice.winner == "prototype" else choice.probe_accuracy
    )
    train_accuracy = float((weights.logits(train_x).argmax(axis=1) == train_y).mean())
    record = {"epoch": 1, "val_accuracy": val_accuracy, "train_accuracy": train_accuracy}
    print(
        f"few-shot head: {choice.winner} wins on {choice.method} ({choice.held_out_images} "
        f"held-out images): prototypes {choice.prototype_accuracy:.3f}, probe (C="
        f"{choice.probe_c}) {choice.probe_accuracy:.3f}; fit on {choice.fit_on}"
    )
    architecture = {"kind": HEAD_KIND, "few_shot": asdict(choice)}
    return HeadResult(head, 1, val_accuracy, train_accuracy, [record], architecture)


def finetune_skip_reason(manifest: pd.DataFrame | Path, params: Params) -> str | None:
    """Why fine-tuning is skipped in few-shot mode (too few train images), or None to run it.

    ``manifest`` may be the manifest's path: it is read only in few-shot mode.
    """
    if not params.data.few_shot:
        return None
    if isinstance(manifest, Path):
        manifest = read_manifest(manifest)
    usable = usable_rows(manifest, "train")
    smallest = int(usable["label"].value_counts().min()) if len(usable) else 0
    needed = params.fewshot.finetune_min_images_per_class
    if smallest >= needed:
        return None
    return (
        f"few-shot mode: the smallest class has {smallest} train images, under "
        f"fewshot.finetune_min_images_per_class = {needed}; fine-tuning is skipped"
    )
