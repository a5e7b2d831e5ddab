"""Test-time augmentation: the model's probabilities averaged over the transformations its data
is declared invariant to (``data.invariances``), inside the exported graph.

The transformations are the group the declared ones generate, as exact pixel permutations of
the model's input tensor: ``hflip`` gives {identity, hflip}; ``hflip`` and ``vflip`` add
``vflip`` and the half turn; ``rot90`` gives the four rotations; ``rot90`` with a flip gives the
eight symmetries of the square. Every element is a transpose (or not), then a flip of the width
(or not), then of the height (or not). :class:`InvariantAverage` stacks the transformed copies
of a batch along the batch axis, runs the model once on them, and returns the log of the mean
softmax, so the ONNX graph holds the model once and ``softmax`` of its output (what graft's
server applies) is the averaged probability. Rotations by a quarter turn need a square input;
on another they are left out.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from graft.engines import Engine, make_runner
from graft.ensemble import FLOOR
from graft.features import iter_batch_outputs
from graft.numeric import softmax

Element = tuple[bool, bool, bool]  # transpose, then flip the width, then flip the height

NAMES: dict[Element, str] = {
    (False, False, False): "identity",
    (False, True, False): "hflip",
    (False, False, True): "vflip",
    (False, True, True): "rot180",
    (True, False, True): "rot90",  # torch.rot90(x, 1, (-2, -1))
    (True, True, False): "rot270",
    (True, False, False): "transpose",
    (True, True, True): "antitranspose",
}
ELEMENTS = {name: element for element, name in NAMES.items()}
GENERATORS: dict[str, Element] = {
    "hflip": ELEMENTS["hflip"],
    "vflip": ELEMENTS["vflip"],
    "rot90": ELEMENTS["rot90"],
}


def transform(images: torch.Tensor, element: Element) -> torch.Tensor:
    """``images`` (..., H, W) transformed by ``element``."""
    transpose, flip_width, flip_height = element
    if transpose:
        images = images.transpose(-2, -1)
    if flip_width:
        images = images.flip(-1)
    if flip_height:
        images = images.flip(-2)
    return images


def group(invariances: Iterable[str], square: bool = True) -> list[str]:
    """The names of the transformations the ``invariances`` generate (identity first).

    ``rot90`` is left out when the input is not ``square``. The closure is computed on a 3x3
    grid of distinct values, on which every element acts differently.
    """
    generators = [GENERATORS[name] for name in invariances if square or name != "rot90"]
    grid = torch.arange(9.0).reshape(3, 3)
    element_of = {
        tuple(transform(grid, e).flatten().tolist()): e
        for e in itertools.product((False, True), repeat=3)
    }
    found = {tuple(grid.flatten().tolist()): grid}
    frontier = [grid]
    while frontier:
        current = frontier.pop()
        for generator in generators:
            image = transform(current, generator)
            key = tuple(image.flatten().tolist())
            if key not in found:
                found[key] = image
                frontier.append(image)
    order = list(NAMES)
    return [NAMES[e] for e in sorted((element_of[k] for k in found), key=order.index)]


class InvariantAverage(nn.Module):
    """``log(mean_g softmax(model(g(x))))`` over the named transformations ``g``, with the model
    run once on the transformed copies stacked along the batch axis."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)
        self.elements = [ELEMENTS[name] for name in self.names]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        stacked = torch.cat([transform(images, element) for element in self.elements])
        probabilities = self.model(stacked).softmax(dim=1)
        probabilities = probabilities.reshape(len(self.elements), -1, probabilities.shape[1])
        return probabilities.mean(dim=0).clamp_min(FLOOR).log()


def group_probabilities(
    members: Sequence[nn.Module],
    images: Sequence[Path],
    image_transform: Callable[[Image.Image], torch.Tensor],
    names: Sequence[str],
    input_size: Sequence[int],
    batch_size: int,
    engine: Engine,
) -> np.ndarray:
    """The members' mean probability on every image under every named transformation:
    ``(len(names), images, classes)``. Its first row (the identity, when listed first) is the
    model without TTA; its mean over the rows, :class:`InvariantAverage`'s probabilities."""
    elements = [ELEMENTS[name] for name in names]
    total = None
    for member in members:
        runner = make_runner(member, input_size, batch_size, engine)

        def run(batch: torch.Tensor, runner=runner) -> np.ndarray:
            return np.stack(
                [softmax(runner(transform(batch, e).contiguous())) for e in elements], axis=0
            )

        out = np.concatenate(
            list(iter_batch_outputs(run, list(images), image_transform, batch_size)), axis=1
        )
        total = out if total is None else total + out
    return total / len(members)


def tta_summary(tta: dict[str, Any]) -> str:
    """One sentence on the TTA decision."""
    names = ", ".join(tta["transformations"])
    if "reason" in tta:
        return f"test-time augmentation not tried: {tta['reason']}"
    verdict = "kept" if tta["kept"] else "not kept"
    text = (
        f"test-time augmentation over {names}: val accuracy {tta['val_accuracy_without']:.4f} "
        f"without, {tta['val_accuracy_with']:.4f} with: {verdict}"
    )
    if tta["choice"]["within_noise"] and any(tta["choice"]["within_noise"].values()):
        text += " (within noise)"
    if tta["kept"]:
        text += f"; test accuracy {tta['test_accuracy_without']:.4f} without it"
    return text
