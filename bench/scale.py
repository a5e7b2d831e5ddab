"""Benchmark: how each pipeline stage's wall time and peak memory grow with the number of images.

For each size, writes a generated image folder (10 classes tinted apart, sides 24 to 320 px,
PNG, JPEG and WebP, 1% bad files: empty or not an image) into a fresh project with this
checkout's dvc.yaml and params.yaml, a tiny timm model (``test_efficientnet``, random weights, its
own 160 px input) and one fine-tuning epoch, then runs ``dvc repro --single-item STAGE`` for each
stage in order under ``/usr/bin/time``: the stage's wall time and the peak resident memory of its
largest process (the ``graft STAGE`` that DVC starts). Reports per stage and size the seconds,
the milliseconds per image and the peak RSS, and between consecutive sizes the growth exponent
of wall time (log t2/t1 over log n2/n1: 1.0 is linear; start-up costs pull it below 1 at small
sizes), the marginal milliseconds per added image and the RSS ratio. The 1-minute load
average is recorded beside each stage: figures taken on a loaded machine are inflated.
On the largest size, after the stages, ``graft validate`` runs again with one process (pinned to
one core by ``taskset``, so graft's pool has one worker) and with the default pool (one process
per core), alternating, ``--validate-repeats`` times each: the speed-up of the pool, with the load
average beside each run. Writes bench/results/scale.json and plots/scale.png.

    python bench/scale.py [--sizes 5000 20000 80000] [--keep DIR] [--append] [--validate-repeats 2]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "scale.json"
PLOT = REPO / "plots" / "scale.png"
STAGES = ("validate", "features", "train_head", "finetune", "evaluate", "export")
SIDES = (24, 32, 48, 64, 96, 128, 160, 224, 320)
FORMATS = (("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"))
PARAMS = {
    "data": {"max_class_imbalance": 10},
    "backbone": {"name": "test_efficientnet", "weights": "random"},
    "head": {"kind": "linear", "epochs": 100, "patience": 10},
    "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 32, "max_minutes": 30},
    "evaluate": {"min_accuracy": 0.0, "vs_probe": False},  # the bench measures cost, not quality
    "export": {"int8_calibration_images": 64},
}


def write_images(data: Path, count: int, seed: int = 0) -> dict[str, int]:
    """``count`` files in data/<class>/ (10 classes, each its own tint over noise); 1% bad."""
    rng = np.random.default_rng(seed)
    tints = rng.integers(40, 216, (10, 3))
    mix = {"bad": 0}
    for index in range(count):
        label = index % 10
        folder = data / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        if index % 100 == 99:
            (folder / f"bad_{index:06d}.png").write_bytes(b"" if index % 200 == 199 else b"text")
            mix["bad"] += 1
            continue
        width, height = rng.choice(SIDES), rng.choice(SIDES)
        noise = rng.integers(-40, 40, (height // 4 + 1, width // 4 + 1, 3))
        pixels = np.clip(tints[label] + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)
        file_format, suffix = FORMATS[index % len(FORMATS)]
        buffer = io.BytesIO()
        image.save(buffer, file_format)
        (folder / f"image_{index:06d}{suffix}").write_bytes(buffer.getvalue())
        mix[suffix] = mix.get(suffix, 0) + 1
    return mix


def make_project(root: Path, images: int) -> dict[str, int]:
    """A DVC project at ``root``: this checkout's pipeline and params, the generated data."""
    root.mkdir(parents=True)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in PARAMS.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    mix = write_images(root / "data", images)
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=root, check=True)
    subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=root, check=True)
    return mix


def run_stage(root: Path, stage: str) -> dict[str, float]:
    """``dvc repro --single-item STAGE`` under /usr/bin/time: wall seconds, peak RSS (MB)."""
    usage = root / f".time-{stage}"
    started = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(usage), "dvc", "repro", "--single-item", stage],
        cwd=root,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"dvc repro {stage} failed in {root}:\n{result.stdout}{result.stderr}")
    peak_kb = int(usage.read_text().split()[-1])
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_kb / 1024),
        "load_average_1m": round(os.getloadavg()[0], 1),
    }


def validation_speedup(root: Path, repeats: int) -> dict:
    """``graft validate`` on one core (one process) and on all (a process per core), alternating."""
    cores = len(os.sched_getaffinity(0))
    seconds: dict[str, list[float]] = {"1": [], str(cores): []}
    loads = []
    for _ in range(repeats):
        for processes, prefix in (("1", ["taskset", "-c", "0"]), (str(cores), [])):
            started = time.perf_counter()
            subprocess.run(
                [*prefix, "graft", "validate"], cwd=root, check=True, capture_output=True
            )
            seconds[processes].append(round(time.perf_counter() - started, 1))
            loads.append(round(os.getloadavg()[0], 1))
    best = {processes: min(times) for processes, times in seconds.items()}
    return {
        "images": int(root.name.split("-")[-1]),
        "seconds": seconds,
        "load_average_1m": loads,
        "processes": cores,
        "speedup_best": round(best["1"] / best[str(cores)], 2),
        "speedup_median_pairs": round(
            float(np.median([a / b for a, b in zip(*seconds.values(), strict=True)])), 2
        ),
    }


def growth(runs: list[dict], stage: str) -> list[dict[str, float]]:
    """Between consecutive sizes: the wall-time growth exponent and the peak-RSS ratio."""
    steps = []
    for small, large in zip(runs, runs[1:], strict=False):
        n1, n2 = small["images"], large["images"]
        t1, t2 = small["stages"][stage]["seconds"], large["stages"][stage]["seconds"]
        m1, m2 = small["stages"][stage]["peak_rss_mb"], large["stages"][stage]["peak_rss_mb"]
        steps.append(
            {
                "from": n1,
                "to": n2,
                "time_exponent": round(math.log(t2 / t1) / math.log(n2 / n1), 2),
                # the cost of each added image, free of the stage's start-up (imports, models)
                "marginal_ms_per_image": round(1000 * (t2 - t1) / (n2 - n1), 2),
                "rss_ratio": round(m2 / m1, 2),
            }
        )
    return steps


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [run["images"] for run in runs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in STAGES:
        left.plot(sizes, [run["stages"][stage]["seconds"] for run in runs], "o-", label=stage)
        right.plot(sizes, [run["stages"][stage]["peak_rss_mb"] for run in runs], "o-", label=stage)
    left.set(xscale="log", yscale="log", xlabel="images", ylabel="wall seconds (dvc repro -s)")
    right.set(xscale="log", xlabel="images", ylabel="peak RSS, MB (largest process)")
    right.axhline(2048, color="grey", linestyle=":", label="2 GB budget")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.suptitle("graft stages vs number of images (test_efficientnet, random weights)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 80000])
    parser.add_argument("--keep", type=Path, help="build the projects here and keep them")
    parser.add_argument(
        "--append", action="store_true", help="add these sizes to bench/results/scale.json's"
    )
    parser.add_argument("--validate-repeats", type=int, default=2)
    args = parser.parse_args()
    validation = None
    runs = json.loads(RESULTS.read_text())["runs"] if args.append and RESULTS.exists() else []
    runs = [run for run in runs if run["images"] not in args.sizes]
    with tempfile.TemporaryDirectory(prefix="graft-scale-") as tmp:
        base = args.keep or Path(tmp)
        for images in sorted(args.sizes):
            root = base / f"images-{images}"
            started = time.perf_counter()
            mix = make_project(root, images)
            generate_seconds = time.perf_counter() - started
            stages = {}
            for stage in STAGES:
                stages[stage] = run_stage(root, stage)
                print(f"{images} images: {stage} {stages[stage]}", flush=True)
            for figures in stages.values():
                figures["ms_per_image"] = round(1000 * figures["seconds"] / images, 2)
            runs.append(
                {
                    "images": images,
                    "files": mix,
                    "generate_seconds": round(generate_seconds, 1),
                    "stages": stages,
                }
            )
            runs.sort(key=lambda run: run["images"])
            write_results(runs)  # after each size: a later failure keeps what was measured
        if args.validate_repeats:
            validation = validation_speedup(root, args.validate_repeats)
            print(f"validation, 1 process vs {validation['processes']}: {validation}", flush=True)
            write_results(runs, validation)
    plot(runs, PLOT)
    print(json.dumps(growth_by_stage(runs), indent=2))


def growth_by_stage(runs: list[dict]) -> dict[str, list[dict[str, float]]]:
    return {stage: growth(runs, stage) for stage in STAGES}


def write_results(runs: list[dict], validation: dict | None = None) -> None:
    figures = {
        "sizes": [run["images"] for run in runs],
        "model": "test_efficientnet (random weights, 160 px), 1 fine-tuning epoch, INT8 export",
        "runs": runs,
        "growth": growth_by_stage(runs),
        "validation_processes": validation,
        "cpus": len(os.sched_getaffinity(0)),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
