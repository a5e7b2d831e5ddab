"""What one request may ask of ``graft serve``; light to import (the CLI reads the defaults)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_PIXELS = 40_000_000  # the training loader's default (params.yaml data.max_pixels)


@dataclass(frozen=True)
class Limits:
    """Requests beyond these get a 413; ``default_top_k`` applies when a request gives none.

    Attributes:
        max_body_bytes: the largest request body, checked before and while it is read.
        max_pixels: the largest width x height of one image, checked from its header.
        max_batch: the most images in one multipart request.
        default_top_k: labels per image when the request has no ``top_k``.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int = 32
    default_top_k: int = 5
