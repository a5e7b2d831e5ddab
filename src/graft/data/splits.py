"""Which split an image belongs to, as a pure function of its content and the seed.

Hashing the content (not the path, not a shuffle of the whole list) means that adding or
removing images never moves the others, that two copies of the same image always land in the
same split (no leakage between train and test), and that every class is split in the same
proportions in expectation.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


def split_position(sha256: str, seed: int) -> float:
    """Map an image's content hash to a uniform number in [0, 1), fixed for a given seed."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()
    return int(digest, 16) / 2**256


def assign_split(sha256: str, seed: int, val_fraction: float, test_fraction: float) -> Split:
    """Assign an image to train, val or test from its content hash.

    Args:
        sha256: hex digest of the image file's bytes.
        seed: changes the whole assignment; keep it fixed to keep splits stable.
        val_fraction: expected share of images in val.
        test_fraction: expected share of images in test.

    Raises:
        ValueError: if a fraction is negative or the two leave nothing for training.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be non-negative "
            "and sum to less than 1"
        )
    position = split_position(sha256, seed)
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"
