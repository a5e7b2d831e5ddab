"""The new head: a linear classifier trained on cached backbone features.

The head is an ``nn.Linear`` over the backbone's pooled features, so its weights drop straight
into the timm model's own classifier for fine-tuning and export.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from graft.config import HeadParams


@dataclass
class HeadResult:
    """The best head found on val, and how training went."""

    head: nn.Linear
    best_epoch: int
    val_accuracy: float
    train_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)


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


def train_linear_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    params: HeadParams,
) -> HeadResult:
    """Full-batch AdamW on the features, stopped early on val accuracy (val loss breaks ties)."""
    torch.manual_seed(params.seed)
    x_train, y_train = torch.tensor(train_x), torch.tensor(train_y).long()
    x_val, y_val = torch.tensor(val_x), torch.tensor(val_y).long()
    head = nn.Linear(train_x.shape[1], num_classes)
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
        loss.backward()
        optimizer.step()
        head.eval()
        with torch.no_grad():
            val_logits = head(x_val)
            val_loss = float(nn.functional.cross_entropy(val_logits, y_val))
            val_acc = accuracy(val_logits, y_val)
        history.append(
            {
                "epoch": epoch,
                "train_loss": loss.item(),
                "val_loss": val_loss,
                "val_accuracy": val_acc,
            }
        )
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
    return HeadResult(head, best_epoch, best[0], train_acc, history)
