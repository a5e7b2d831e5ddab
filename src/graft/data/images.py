"""The one image loader used by validation, training, export parity and serving."""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# The containers those extensions hold, as Pillow names its parsers (JPEG's also reads camera
# multi-picture files, format MPO). Only these parsers ever run on a file's bytes; anything else
# Pillow recognises is refused as ``unsupported_format``.
SUPPORTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
# Image files graft recognises but cannot use: quarantined as ``unsupported_format``, so a
# class folder of HEIC phone photos is reported rather than ignored.
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset(
    {".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".svg", ".psd", ".ico", ".ppm", ".pgm"}
    | {".pbm", ".tga", ".dds", ".eps", ".raw", ".dng", ".cr2", ".nef", ".arw", ".orf", ".exr"}
)


# The eval transforms (timm's, and serving's copy of it in graft.serving.model) scale an image's
# shorter side to the model's size and keep its aspect ratio, so a 20000x1 PNG of 101 bytes
# would become 5,120,000x256 pixels before the centre crop. One bound, checked from the header
# before anything is decoded and again before any resize, keeps that in proportion everywhere.
MAX_ASPECT_RATIO = 20.0
MAX_RESIZED_PIXELS = 16_000_000


class ImageRejected(ValueError):
    """An image that cannot be used; ``reason`` is a short, stable code for the manifest."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    """A fully decoded image and what the file itself said about it.

    Attributes:
        image: RGB pixels with the EXIF orientation applied.
        format: the container format as Pillow names it (``PNG``, ``JPEG``, ...).
        mode: the file's own pixel mode before conversion to RGB (``L``, ``P``, ``RGBA``, ...).
    """

    image: Image.Image
    format: str
    mode: str


def decode_image(
    source: str | Path | bytes | BinaryIO, *, min_size: int = 1, max_pixels: int = 40_000_000
) -> DecodedImage:
    """Fully decode a file, or its bytes, into RGB, keeping the original format and mode.

    The pixel count is checked from the header before decoding, so a decompression bomb is
    refused without allocating it.

    Args:
        source: a path to the image file, the file's bytes (e.g. an HTTP request body), or
            an open binary file at its start (read as Pillow needs it, not whole).
        min_size: smallest accepted width or height, in pixels.
        max_pixels: largest accepted width x height.

    Raises:
        ImageRejected: with reason ``empty``, ``not_an_image``, ``unsupported_format`` (an
            image, but not one of ``SUPPORTED_FORMATS`` or in a pixel mode that has no RGB
            form), ``too_many_pixels`` (also when memory runs out), ``extreme_aspect_ratio``
            (:func:`check_resize_bound`), ``truncated``, or ``too_small``.
    """
    if isinstance(source, bytes):
        size, opened = len(source), io.BytesIO(source)
    elif isinstance(source, str | Path):
        size, opened = Path(source).stat().st_size, Path(source)
    else:
        size, opened = os.fstat(source.fileno()).st_size, source
    if size == 0:
        raise ImageRejected("empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opened, formats=SUPPORTED_FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageRejected(
                        "too_many_pixels", f"{width}x{height} exceeds max_pixels={max_pixels}"
                    )
                check_resize_bound(width, height)
                file_format, file_mode = image.format or "", image.mode
                image.load()
                oriented = ImageOps.exif_transpose(image)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_many_pixels", str(exc)) from None
    except MemoryError:
        raise ImageRejected("too_many_pixels", "not enough memory to decode it") from None
    except Image.UnidentifiedImageError:
        raise _unidentified(opened) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("truncated", f"decode failed: {exc}") from None
    try:
        rgb = _to_rgb(oriented)
    except MemoryError:
        raise ImageRejected("too_many_pixels", "not enough memory to convert it to RGB") from None
    except (OSError, ValueError) as exc:
        raise ImageRejected("unsupported_format", f"pixel mode {file_mode}: {exc}") from None
    if min(rgb.size) < min_size:
        raise ImageRejected(
            "too_small", f"{rgb.size[0]}x{rgb.size[1]} is under min_size={min_size}"
        )
    return DecodedImage(image=rgb, format=file_format, mode=file_mode)


def check_resize_bound(width: int, height: int, resized_pixels: int | None = None) -> None:
    """Refuse an image whose resize to a model's input would cost far more than the image.

    The one bound of the training loader and of serving: at most ``MAX_ASPECT_RATIO`` (20:1),
    and, where the size of the resize is known, at most ``MAX_RESIZED_PIXELS`` after it. For a
    224-pixel model (resized to 256 on its shorter side) the first alone caps a resized image
    at 256 x 5,120 pixels.

    Args:
        width, height: the image's size, as its header gives it.
        resized_pixels: width x height after the resize, when the caller knows it.

    Raises:
        ImageRejected: ``extreme_aspect_ratio`` or ``too_many_pixels``.
    """
    if min(width, height) < 1:
        return  # nothing to resize; the loader's min_size reports it
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageRejected(
            "extreme_aspect_ratio",
            f"{width}x{height} is {ratio:.0f}:1, beyond {MAX_ASPECT_RATIO:g}:1: resizing its "
            "shorter side to the model's input would make it that many times longer; crop it",
        )
    if resized_pixels is not None and resized_pixels > MAX_RESIZED_PIXELS:
        raise ImageRejected(
            "too_many_pixels",
            f"{width}x{height} resized for the model would be {resized_pixels:,} pixels, "
            f"beyond {MAX_RESIZED_PIXELS:,}",
        )


def keep_ratio_pixels(width: int, height: int, shorter_side: int) -> int:
    """Pixels of ``width`` x ``height`` resized to ``shorter_side`` on its shorter side, the
    aspect ratio kept (torchvision's ``Resize(int)``, rounding up)."""
    ratio = max(width, height) / max(1, min(width, height))
    return shorter_side * math.ceil(shorter_side * ratio)


def load_image(path: str | Path, *, min_size: int = 1, max_pixels: int = 40_000_000) -> Image.Image:
    """Fully decode ``path`` into an RGB image with its EXIF orientation applied.

    Raises:
        ImageRejected: as :func:`decode_image`.
    """
    return decode_image(Path(path), min_size=min_size, max_pixels=max_pixels).image


def _unidentified(opened: BinaryIO | Path) -> ImageRejected:
    """Tell a picture in a format graft does not take from bytes that are no picture at all."""
    if not isinstance(opened, Path):
        opened.seek(0)
    try:
        with Image.open(opened) as image:  # reads the header only, never the pixels
            found = image.format or "unknown"
    except Exception:  # any parser's complaint means the same: not an image
        return ImageRejected("not_an_image", "Pillow cannot identify the format")
    return ImageRejected(
        "unsupported_format", f"{found} is not one of {', '.join(SUPPORTED_FORMATS)}"
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency on white so the same file always gives the same pixels.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        # 16-bit samples to 8-bit: 0..65535 onto 0..255 (values beyond 16 bits saturate).
        # Through NumPy, which reads either byte order (Pillow's point() refuses I;16B).
        samples = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(samples.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")
