"""Benchmark: validation throughput on generated images of mixed sizes, pinned to 2 CPU cores.

Writes a data folder of ``--images`` PNG and JPEG files (10 classes, sides from 64 to 1024
pixels, a few percent of them bad: truncated, empty, text), then times :func:`graft.validate`
end to end: full decode of every file, hashing, splits, the Great Expectations suite and the
drift profile. Great Expectations is imported before timing (a once-per-process cost,
reported separately). Then the expectation suite alone on synthetic manifests of
``--suite-rows`` rows (10 classes, 1% quarantined, every row distinct): its seconds and
microseconds per row, and the growth exponent between sizes (1.0: linear). Writes
bench/results/validate.json (or ``--results``), with the 1-minute load average.

    python bench/validate.py [--images 1200] [--cores 2] [--suite-rows 20000 200000 1000000]
        [--results PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from graft.config import DataParams
from graft.data.expectations import ManifestSuite
from graft.data.manifest import MANIFEST_COLUMNS
from graft.validate import validate

RESULTS = Path(__file__).parent / "results" / "validate.json"
SIDES = (64, 128, 256, 512, 1024)  # at most 16:1, inside graft.data.images.MAX_ASPECT_RATIO


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


def synthetic_manifest(rows: int, seed: int = 0) -> pd.DataFrame:
    """A manifest of ``rows`` distinct files in 10 classes, 1% quarantined, no file behind it."""
    rng = np.random.default_rng(seed)
    index = np.arange(rows)
    bad = index % 100 == 99
    labels = np.char.add("class_", (index % 10).astype(str))
    frame = pd.DataFrame(
        {
            "path": [f"{label}/image_{i:07d}.png" for label, i in zip(labels, index, strict=True)],
            "label": labels,
            "split": rng.choice(["train", "val", "test"], rows, p=[0.7, 0.15, 0.15]),
            "sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in index],
            "bytes": pd.array(rng.integers(100, 100_000, rows), dtype="Int64"),
            "format": "PNG",
            "mode": "RGB",
            "width": pd.array(rng.integers(24, 321, rows), dtype="Int64"),
            "height": pd.array(rng.integers(24, 321, rows), dtype="Int64"),
            "brightness": pd.array(rng.uniform(0, 255, rows).round(2), dtype="Float64"),
            "status": np.where(bad, "quarantined", "ok"),
            "reason": np.where(bad, "not_an_image", ""),
        },
        columns=list(MANIFEST_COLUMNS),
    )
    for column in ("sha256", "format", "mode"):
        frame[column] = frame[column].where(~bad, "")
    for column in ("bytes", "width", "height", "brightness"):
        frame.loc[bad, column] = pd.NA
    text = [column for column in MANIFEST_COLUMNS if column not in ("bytes", "width", "height")]
    return frame.astype({column: object for column in text if column != "brightness"})


def suite_scaling(sizes: list[int]) -> dict:
    """Seconds of the expectation suite (built once) on manifests of each size."""
    labels = [f"class_{label}" for label in range(10)]
    suite = ManifestSuite(labels=labels, params=DataParams())
    seconds = {}
    for rows in sizes:
        manifest = synthetic_manifest(rows)
        started = time.perf_counter()
        outcome = suite.run(manifest)
        seconds[rows] = time.perf_counter() - started
        if not outcome["success"]:
            raise RuntimeError(f"the synthetic manifest failed the suite: {outcome['failed']}")
    sizes = sorted(seconds)
    return {
        "rows": sizes,
        "seconds": [round(seconds[rows], 2) for rows in sizes],
        "microseconds_per_row": [round(1e6 * seconds[rows] / rows, 1) for rows in sizes],
        "time_exponent": [
            round(math.log(seconds[b] / seconds[a]) / math.log(b / a), 2)
            for a, b in zip(sizes, sizes[1:], strict=False)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--suite-rows", type=int, nargs="*", default=[20_000, 200_000, 1_000_000])
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
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
        "suite": suite_scaling(args.suite_rows) if args.suite_rows else None,
        "load_average_1m": round(os.getloadavg()[0], 1),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
