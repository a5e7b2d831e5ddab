"""Images to tensors, exactly as the backbone's timm data config says."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm.data
import torch
from PIL import Image

from graft.data.images import (
    ImageRejected,
    check_resize_bound,
    decode_image,
    keep_ratio_pixels,
)
from graft.data_config import DataConfig
from graft.errors import InputError

ImageSource = Path | bytes  # a file, or its bytes (shipped to a remote worker)


class UnreadableImageError(InputError):
    """An image the manifest lists as usable does not decode any more."""


def eval_transform(data_config: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """timm's evaluation transform (resize, centre crop, normalise) for ``data_config``, behind
    the loader's resize bound (:func:`graft.data.images.check_resize_bound`)."""
    transform = timm.data.create_transform(**data_config.timm_kwargs(), is_training=False)
    shorter_side = math.floor(max(data_config.input_size[1:]) / data_config.crop_pct)
    return BoundedTransform(transform, shorter_side)


@dataclass(frozen=True)
class BoundedTransform:
    """A transform that refuses (``ImageRejected``) what it would resize out of proportion, and
    turns running out of memory into a refusal of that image, never a crash of the run."""

    transform: Callable[[Image.Image], torch.Tensor]
    shorter_side: int  # what the transform resizes the image's shorter side to, at most

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        check_resize_bound(width, height, keep_ratio_pixels(width, height, self.shorter_side))
        try:
            return self.transform(image)
        except MemoryError:
            raise ImageRejected("too_many_pixels", "not enough memory to preprocess it") from None


def resize_and_crop(data_config: DataConfig) -> Callable[[Image.Image], np.ndarray]:
    """The geometric steps of :func:`eval_transform` alone: an RGB image resized and cropped to
    the model's input size, as ``uint8`` ``(height, width, 3)`` pixels (what a model with its
    normalisation inside the graph takes, see :mod:`graft.portable`)."""
    bounded = eval_transform(data_config)
    steps = list(
        itertools.takewhile(
            lambda step: not isinstance(step, timm.data.transforms.MaybeToTensor),
            bounded.transform.transforms,
        )
    )

    def geometry(image: Image.Image) -> Image.Image:
        for step in steps:
            image = step(image)
        return image

    resize = BoundedTransform(geometry, bounded.shorter_side)

    def pixels(image: Image.Image) -> np.ndarray:
        return np.asarray(resize(image).convert("RGB"), dtype=np.uint8)

    return pixels


def load_rgb(source: ImageSource) -> Image.Image:
    """Fully decode an image file, or its bytes, with the shared loader (RGB, EXIF-oriented)."""
    return decode_image(source if isinstance(source, bytes) else Path(source)).image


def load_tensor_batch(
    paths: Sequence[ImageSource], transform: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor:
    """Decode ``paths`` (files or their bytes) and stack them into one NCHW batch.

    Raises:
        UnreadableImageError: naming the file, if one no longer decodes.
    """
    tensors = []
    for path in paths:
        try:
            tensors.append(transform(load_rgb(path)))
        except ImageRejected as exc:
            name = "an image shipped as bytes" if isinstance(path, bytes) else str(path)
            raise UnreadableImageError(
                f"{name} no longer decodes ({exc}) although the manifest lists it as ok: "
                "the data changed after validation; re-run `graft validate` (or `dvc repro`)."
            ) from exc
    return torch.stack(tensors)
