"""The one image loader used by validation, training, export parity and serving."""

from __future__ import annotations

import io
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
            form), ``too_many_pixels``, ``truncated``, or ``too_small``.
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
                file_format, file_mode = image.format or "", image.mode
                image.load()
                oriented = ImageOps.exif_transpose(image)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_many_pixels", str(exc)) from None
    except Image.UnidentifiedImageError:
        raise _unidentified(opened) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("truncated", f"decode failed: {exc}") from None
    try:
        rgb = _to_rgb(oriented)
    except (OSError, ValueError) as exc:
        raise ImageRejected("unsupported_format", f"pixel mode {file_mode}: {exc}") from None
    if min(rgb.size) < min_size:
        raise ImageRejected(
            "too_small", f"{rgb.size[0]}x{rgb.size[1]} is under min_size={min_size}"
        )
    return DecodedImage(image=rgb, format=file_format, mode=file_mode)


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
