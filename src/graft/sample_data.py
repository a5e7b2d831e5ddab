"""The embedded sample: scikit-learn's handwritten digits written as an image folder.

1,797 real 8x8 scans in 10 classes ship inside scikit-learn, so the whole pipeline runs offline.
The PNGs are written uncompressed (zlib level 0, no timestamps) so that their bytes, and with
them the committed ``data.dvc``, are the same on every machine and Pillow version.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def digit_images(per_class: int | None = None) -> list[tuple[str, str, bytes]]:
    """Return ``(class_name, file_name, png_bytes)`` for the digits, in a fixed order.

    Args:
        per_class: keep only the first this-many images of each class (all when None).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[int, int] = {}
    out = []
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        target = int(target)
        if per_class is not None and counts.get(target, 0) >= per_class:
            continue
        counts[target] = counts.get(target, 0) + 1
        # 0..16 ink intensity -> dark ink on white paper, like the original scans.
        grey = (255 - np.rint(pixels * (255 / 16))).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(grey, mode="L").save(buffer, format="PNG", compress_level=0)
        out.append((str(target), f"digit_{index:04d}.png", buffer.getvalue()))
    return out


def write_sample_data(dest: Path, per_class: int | None = None) -> int:
    """Write the digits into ``dest/<class>/digit_NNNN.png``; return how many were written.

    Refuses to touch a folder that already holds files, so user data is never overwritten.

    Raises:
        FileExistsError: if ``dest`` exists and is not empty.
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(
            f"{dest} is not empty; graft writes the sample only into an empty or missing folder "
            "and never overwrites data. Point it at another folder or use your own images."
        )
    images = digit_images(per_class)
    staging = dest.with_name(f".{dest.name}.sample-tmp")
    for class_name, file_name, png in images:
        path = staging / class_name / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
    if dest.exists():
        dest.rmdir()
    staging.rename(dest)
    return len(images)
