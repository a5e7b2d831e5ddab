"""Benchmark: validation throughput on generated images of mixed sizes, pinned to 2 CPU cores.

Writes a data folder of ``--images`` PNG and JPEG files (10 classes, sides from 32 to 1024
pixels, a few percent of them bad: truncated, empty, text), then times :func:`graft.validate`
end to end: full decode of every file, hashing, splits, the Great Expectations suite and the
drift profile. Great Expectations is imported before timing (a once-per-process cost,
reported separately). Writes bench/results/validate.json.

    python bench/validate.py [--images 1200] [--cores 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from graft.config import DataParams
from graft.validate import validate

RESULTS = Path(__file__).parent / "results" / "validate.json"
SIDES = (32, 64, 128, 256, 512, 1024)


def write_images(data: Path, count: int, seed: int = 0) -> dict[str, int]:
    """``count`` files in data/<class>/, mixed sizes and formats; returns their size mix."""
    rng = np.random.default_rng(seed)
    mix: dict[str, int] = {}
    for index in range(count):
        folder = data / f"class_{index % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        if index % 50 == 49:  # 2% bad files, quarantined with a reason
            (folder / f"bad_{index}.png").write_bytes(b"" if index % 100 == 99 else b"text")
            mix["bad"] = mix.get("bad", 0) + 1
            continue
        width, height = rng.choice(SIDES), rng.choice(SIDES)
        pixels = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)
        file_format = "JPEG" if index % 2 else "PNG"
        buffer = io.BytesIO()
        image.save(buffer, file_format)
        suffix = ".jpg" if file_format == "JPEG" else ".png"
        (folder / f"image_{index:05d}{suffix}").write_bytes(buffer.getvalue())
        key = f"{max(width, height)}px"
        mix[key] = mix.get(key, 0) + 1
    return dict(
        sorted(mix.items(), key=lambda item: int(item[0][:-2]) if item[0][0].isdigit() else 0)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cores)  # threads started from here on share these cores
    started = time.perf_counter()
    import great_expectations  # noqa: F401  (timed apart: paid once per process)

    import_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        mix = write_images(data, args.images)
        total_bytes = sum(path.stat().st_size for path in data.rglob("*") if path.is_file())
        started = time.perf_counter()
        result = validate(data, DataParams())
        seconds = time.perf_counter() - started
    summary = result.summary
    figures = {
        "images": summary["images"],
        "ok": summary["ok"],
        "quarantined": summary["quarantined"],
        "megabytes": round(total_bytes / 1e6, 1),
        "largest_side_mix": mix,
        "cores": len(cores),
        "seconds": round(seconds, 2),
        "images_per_second": round(summary["images"] / seconds, 1),
        "great_expectations_import_seconds": round(import_seconds, 2),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
