"""LP-FT: fine-tune the top of the backbone together with the head trained on its features.

The lower blocks stay frozen with their BatchNorm statistics, and this stage applies no
augmentation, so their output for an image never changes during fine-tuning. It is therefore
computed once ("the frozen prefix") and every epoch runs only the unfrozen top: the same result
as pushing each image through the whole network every epoch, at a fraction of the cost.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from graft.config import FinetuneParams
from graft.engines import Engine, make_runner
from graft.errors import GraftError
from graft.features import forward_in_batches
from graft.head import accuracy
from graft.progress import progress


class FinetuneError(GraftError):
    """Fine-tuning cannot run as configured."""


@dataclass(frozen=True)
class TrunkSplit:
    """A classifier cut in two: a frozen prefix and a trainable top that ends in the logits."""

    prefix: nn.Module
    top: Callable[[torch.Tensor], torch.Tensor]
    backbone_top: list[nn.Module]
    head: nn.Module


@dataclass
class FinetuneResult:
    state_dict: dict[str, torch.Tensor]
    head_val_accuracy: float
    val_accuracy: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def split_trunk(model: nn.Module, unfreeze_blocks: int) -> TrunkSplit:
    """Cut a timm EfficientNet-style model below its top ``unfreeze_blocks`` entries of ``blocks``.

    Raises:
        FinetuneError: if the model has no such structure or fewer blocks than asked.
    """
    needed = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")
    if not all(hasattr(model, name) for name in needed):
        raise FinetuneError(
            f"Fine-tuning supports timm EfficientNet-family backbones (conv_stem, blocks, "
            f"conv_head); {type(model).__name__} is not one. Set finetune.enabled: false."
        )
    blocks = model.blocks
    if unfreeze_blocks > len(blocks):
        raise FinetuneError(
            f"finetune.unfreeze_blocks is {unfreeze_blocks}, but the backbone has only "
            f"{len(blocks)} blocks: choose 1 to {len(blocks)}."
        )
    lower, upper = blocks[: len(blocks) - unfreeze_blocks], blocks[len(blocks) - unfreeze_blocks :]
    prefix = nn.Sequential(model.conv_stem, model.bn1, lower)

    def top(h: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.bn2(model.conv_head(upper(h))))

    return TrunkSplit(prefix, top, [upper, model.conv_head, model.bn2], model.get_classifier())


def _evaluate_top(split: TrunkSplit, activations: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = torch.cat([split.top(chunk) for chunk in activations.split(256)])
    return accuracy(logits, labels)


def finetune(
    model: nn.Module,
    train_paths: Sequence[Path],
    train_labels: np.ndarray,
    val_paths: Sequence[Path],
    val_labels: np.ndarray,
    transform: Callable[[Image.Image], torch.Tensor],
    input_size: list[int],
    params: FinetuneParams,
    engine: Engine = "auto",
) -> FinetuneResult:
    """Fine-tune ``model`` (backbone + trained head) and return its best state on val.

    Epoch 0 is the model as given, so ``head_val_accuracy`` is the LP baseline measured the same
    way as every fine-tuned epoch. ``engine`` computes the frozen prefix (see graft.engines).
    """
    torch.manual_seed(params.seed)
    model.eval()  # eval mode throughout: BatchNorm statistics stay frozen
    split = split_trunk(model, params.unfreeze_blocks)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    backbone_params = [p for module in split.backbone_top for p in module.parameters()]
    head_params = list(split.head.parameters())
    for parameter in backbone_params + head_params:
        parameter.requires_grad_(True)

    runner = make_runner(split.prefix, input_size, params.batch_size, engine)

    def prefix_of(paths: Sequence[Path], name: str) -> torch.Tensor:
        array = forward_in_batches(
            runner, paths, transform, params.batch_size, f"frozen prefix ({name})"
        )
        return torch.from_numpy(array).contiguous(memory_format=torch.channels_last)

    train_h, val_h = prefix_of(train_paths, "train"), prefix_of(val_paths, "val")
    model.to(memory_format=torch.channels_last)
    y_train, y_val = torch.tensor(train_labels).long(), torch.tensor(val_labels).long()

    optimizer = torch.optim.AdamW(
        [
            {"params": backbone_params, "lr": params.lr},
            {"params": head_params, "lr": params.head_lr},
        ],
        weight_decay=params.weight_decay,
    )
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(params.seed)
    head_val = _evaluate_top(split, val_h, y_val)
    best_val, best_epoch, best_state = head_val, 0, copy.deepcopy(model.state_dict())
    history = [{"epoch": 0, "train_loss": float("nan"), "val_accuracy": head_val}]
    for epoch in range(1, params.epochs + 1):
        order = torch.randperm(len(y_train), generator=generator)
        total_loss = 0.0
        bar = progress(len(y_train), f"finetune epoch {epoch}/{params.epochs}")
        for batch in order.split(params.batch_size):
            optimizer.zero_grad()
            loss = loss_fn(split.top(train_h[batch]), y_train[batch])
            if not torch.isfinite(loss.detach()):
                raise FinetuneError(
                    f"Fine-tuning loss became {float(loss)} in epoch {epoch}: lower finetune.lr "
                    f"(now {params.lr}) or finetune.head_lr (now {params.head_lr})."
                )
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
            bar.update(len(batch))
        val_acc = _evaluate_top(split, val_h, y_val)
        bar.set_postfix(loss=f"{total_loss / len(y_train):.4f}", val_accuracy=f"{val_acc:.4f}")
        bar.close()
        history.append(
            {"epoch": epoch, "train_loss": total_loss / len(y_train), "val_accuracy": val_acc}
        )
        if val_acc > best_val:
            best_val, best_epoch, best_state = val_acc, epoch, copy.deepcopy(model.state_dict())
    return FinetuneResult(best_state, head_val, best_val, best_epoch, history)
