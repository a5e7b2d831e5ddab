"""The probability average of the head and the fine-tuned model, a candidate beside the two.

Two models that err on different images average to fewer errors. The average is one
``nn.Module`` (so one ONNX graph): each member's softmax, averaged, returned as log-probabilities,
whose softmax (what graft's server applies to any model's output) is the average again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

FLOOR = 1e-12  # a probability this small is 0 for every purpose; its log stays finite in ONNX


class ProbabilityAverage(nn.Module):
    """``log(mean_i softmax(member_i(x)))``: ``softmax`` of it is the members' mean probability."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probabilities = torch.stack([m(images).softmax(dim=1) for m in self.members]).mean(dim=0)
        return probabilities.clamp_min(FLOOR).log()


def average_probabilities(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """The members' mean probability per image and class, as :class:`ProbabilityAverage`."""
    return np.mean(np.stack(probabilities), axis=0)
