"""The new head on cached backbone features: the cross-validated probe, a linear layer or an MLP.

The default (``probe``) is the standard linear probe: a logistic regression whose L2 strength is
chosen by stratified k-fold cross-validation over train and val (:mod:`graft.probe`). It is
reported on val as fit on train alone (the honest figure, and the start of fine-tuning), and
shipped refit on train and val together.

The probe and the gradient-trained ``linear`` head are an ``nn.Linear`` over the backbone's
pooled features, so their weights drop straight into the timm model's own classifier for
fine-tuning and export; the MLP head replaces that classifier with ``Linear -> ReLU -> Dropout
-> Linear``. Those two train by full-batch AdamW on the feature matrix, early-stopped on val.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from graft.config import HeadParams
from graft.errors import GraftError
from graft.probe import (
    budget_rows,
    cv_probe,
    fit_within,
    logits_in_chunks,
    out_of_fold_logits,
    stack_rows,
)


class HeadError(GraftError):
    """The head cannot be trained as configured (for instance, its loss became NaN)."""


@dataclass
class HeadResult:
    """The best head found on val, and how training went."""

    head: nn.Module
    best_epoch: int
    val_accuracy: float
    train_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)
    architecture: dict[str, Any] = field(default_factory=dict)
    # The probe only: the head refit on train + val (the one to ship; ``head`` is fit on train
    # alone, so that its val accuracy is honest), and the cross-validation that chose its C.
    refit: nn.Module | None = None
    search: dict[str, Any] | None = None
    # The probe only: the val images' logits from the probe fit on the other CV folds of
    # train + val (out of fold): honest val scores of a probe trained as ``refit`` was.
    val_oof_logits: np.ndarray | None = None

    @property
    def shipped(self) -> nn.Module:
        """The head to ship: the refit on train + val when there is one."""
        return self.head if self.refit is None else self.refit


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(dim=1) == labels).float().mean())


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Weights inversely proportional to class frequency (scikit-learn's ``balanced``)."""
    present = np.unique(labels)
    weights = np.ones(num_classes, dtype=np.float32)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.from_numpy(weights)


def head_architecture(params: HeadParams) -> dict[str, Any]:
    """What ``make_head`` needs to rebuild the head; it travels in the model files (the probe is
    a plain ``Linear``)."""
    if params.kind == "mlp":
        return {"kind": "mlp", "hidden": params.hidden, "dropout": params.dropout}
    return {"kind": "linear"}


class L2Normalize(nn.Module):
    """Scale each feature vector to unit length (ONNX: ReduceL2 and Div)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(features, dim=1)


def l2_linear_head(in_features: int, num_classes: int) -> nn.Module:
    """The few-shot head kind (graft.fewshot): ``Linear`` on L2-normalised features."""
    return nn.Sequential(L2Normalize(), nn.Linear(in_features, num_classes))


def make_head(in_features: int, num_classes: int, architecture: dict[str, Any]) -> nn.Module:
    """A fresh head: ``nn.Linear`` for ``{"kind": "linear"}``, or the MLP for ``"mlp"``."""
    kind = architecture.get("kind", "linear")
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind == "mlp":
        hidden = int(architecture["hidden"])
        return nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(float(architecture["dropout"])),
            nn.Linear(hidden, num_classes),
        )
    if kind == "l2_linear":  # the few-shot heads (graft.fewshot): Linear on unit-length features
        return l2_linear_head(in_features, num_classes)
    raise HeadError(f"Unknown head kind {kind!r}: use head.kind probe, linear or mlp.")


def train_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    params: HeadParams,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> HeadResult:
    """The head ``params.kind`` asks for: the cross-validated probe, or full-batch AdamW on the
    features (``linear``, ``mlp``), stopped early on val accuracy (val loss breaks ties).

    Raises:
        HeadError: if the training loss becomes NaN or infinite.
    """
    if params.kind == "probe":
        return train_probe_head(train_x, train_y, val_x, val_y, num_classes, params)
    torch.manual_seed(params.seed)
    x_train, y_train = torch.tensor(train_x), torch.tensor(train_y).long()
    x_val, y_val = torch.tensor(val_x), torch.tensor(val_y).long()
    architecture = head_architecture(params)
    head = make_head(train_x.shape[1], num_classes, architecture)
    loss_fn = nn.CrossEntropyLoss(
        weight=balanced_class_weights(train_y, num_classes), label_smoothing=params.label_smoothing
    )
    optimizer = torch.optim.AdamW(head.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    best = (-1.0, float("-inf"))
    best_state, best_epoch, stale, history = None, 0, 0, []
    for epoch in range(1, params.epochs + 1):
        head.train()
        optimizer.zero_grad()
        loss = loss_fn(head(x_train), y_train)
        if not math.isfinite(loss.item()):
            raise HeadError(
                f"The head's training loss became {loss.item()} in epoch {epoch}: lower head.lr "
                f"(now {params.lr}) or check the features for NaN values."
            )
        loss.backward()
        optimizer.step()
        head.eval()
        with torch.no_grad():
            val_logits = head(x_val)
            val_loss = float(nn.functional.cross_entropy(val_logits, y_val))
            val_acc = accuracy(val_logits, y_val)
        record = {
            "epoch": epoch,
            "train_loss": loss.item(),
            "val_loss": val_loss,
            "val_accuracy": val_acc,
        }
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        score = (val_acc, -val_loss)
        if score > best:
            best, best_state, best_epoch, stale = score, copy.deepcopy(head.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= params.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    with torch.no_grad():
        train_acc = accuracy(head(x_train), y_train)
    return HeadResult(head, best_epoch, best[0], train_acc, history, architecture)


def train_probe_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    params: HeadParams,
) -> HeadResult:
    """The cross-validated logistic probe: C by stratified k-fold CV over train + val, then fit
    on train (``head``: scored on val, fine-tuning starts from it) and on train + val
    (``refit``: shipped).

    Raises:
        HeadError: if a feature is NaN or infinite.
    """
    chunk = budget_rows(train_x, params.probe_max_mb)  # train_x, val_x may be memory-mapped
    for name, x in (("train", train_x), ("val", val_x)):
        if not all(np.isfinite(x[i : i + chunk]).all() for i in range(0, len(x), chunk)):
            raise HeadError(
                f"The {name} features hold NaN or infinite values: re-run the features stage "
                "(or check the backbone weights)."
            )
    pool_x, pool_y = stack_rows(train_x, val_x, chunk), np.concatenate([train_y, val_y])
    refit, search = cv_probe(pool_x, pool_y, num_classes, params)
    head = fit_within(train_x, train_y, num_classes, search.c, params)
    oof = out_of_fold_logits(
        pool_x,
        pool_y,
        num_classes,
        search.c,
        params.cv_folds,
        params.standardize,
        params.seed,
        max_mb=params.probe_max_mb,
    )
    y_train, y_val = torch.from_numpy(train_y).long(), torch.from_numpy(val_y).long()
    with torch.no_grad():
        train_logits = torch.from_numpy(logits_in_chunks(head, train_x, chunk))
        val_logits = torch.from_numpy(logits_in_chunks(head, val_x, chunk))
        record = {
            "epoch": 1,
            "train_loss": float(nn.functional.cross_entropy(train_logits, y_train)),
            "val_loss": (
                float(nn.functional.cross_entropy(val_logits, y_val)) if len(y_val) else math.nan
            ),
            "val_accuracy": accuracy(val_logits, y_val),
        }
    summary = {
        "c": search.c,
        "cv_accuracy": search.cv_accuracy,
        "cv_std": search.cv_std,
        "folds": search.folds,
        "at_grid_edge": search.at_grid_edge,
        "images": len(pool_y),
        "cv_images": search.images,  # fewer when train+val passes head.probe_max_mb
        "standardize": params.standardize,
        "scores": {str(c): list(score) for c, score in search.scores.items()},
    }
    return HeadResult(
        head=head,
        best_epoch=1,
        val_accuracy=record["val_accuracy"],
        train_accuracy=accuracy(train_logits, y_train),
        history=[record],
        architecture={"kind": "linear"},
        refit=refit,
        search=summary,
        val_oof_logits=oof[len(train_y) :],
    )
