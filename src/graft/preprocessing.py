"""Images to tensors, exactly as the backbone's timm data config says."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm.data
import torch
from PIL import Image

from graft.data.images import load_image


def eval_transform(data_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """timm's evaluation transform (resize, centre crop, normalise) for ``data_config``."""
    config = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in data_config.items()
    }
    return timm.data.create_transform(**config, is_training=False)


def load_tensor_batch(
    paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor:
    """Decode ``paths`` with the shared loader and stack them into one NCHW batch."""
    return torch.stack([transform(load_image(path)) for path in paths])
