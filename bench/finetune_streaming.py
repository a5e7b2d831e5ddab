"""Benchmark: fine-tuning's peak memory as the number of images grows, the frozen prefix held in
memory vs streamed from disk shards (``finetune.prefix_memory_mb``).

Writes a folder of generated images (10 classes, each its own tint over noise, 64 px PNG), then
for each size and mode runs ``graft.finetune.finetune`` (``test_efficientnet``, random weights,
its 160 px input, recipe top2-frozen, 1 epoch, 80% train / 20% val) in a fresh process under
``/usr/bin/time -f %M``: its peak resident memory and wall time. Modes: ``in_memory`` (a budget
above any split), ``streamed`` (``--stream-mb``, below every split) and ``default`` (the
params.yaml default, 256 MB). Reports, per mode, the peak RSS ratio between the largest and the
smallest size, and per size the streamed run's RSS and fine-tuning time over the in-memory
run's. A first, unrecorded run warms the file cache; then every size and mode runs
``--repeats`` times, interleaved, and each figure is the least of its repeats (the machine is
shared: other jobs only ever add). The 1-minute load average is recorded beside each run.
Writes bench/results/finetune_streaming.json.

    python bench/finetune_streaming.py [--sizes 2000 8000] [--stream-mb 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "finetune_streaming.json"


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    tints = rng.integers(40, 216, (10, 3))
    for index in range(count):
        label = index % 10
        pixels = (tints[label] + rng.normal(0, 40, (64, 64, 3))).clip(0, 255).astype(np.uint8)
        path = folder / str(label) / f"{index:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)


def child(data: Path, images: int, budget_mb: float | None, scratch: Path) -> None:
    """One fine-tuning run on the first ``images`` files; prints its report as JSON."""
    import torch

    from graft.backbones import create_backbone
    from graft.config import FinetuneParams
    from graft.finetune import finetune
    from graft.preprocessing import eval_transform

    paths = sorted(data.rglob("*.png"))[:images]
    labels = np.array([int(p.parent.name) for p in paths])
    val = np.arange(len(paths)) % 5 == 0
    torch.manual_seed(0)
    backbone = create_backbone("test_efficientnet", "random", num_classes=10)
    settings = {"recipes": ["top2-frozen"], "epochs": 1, "warmup_epochs": 0, "batch_size": 32}
    if budget_mb is not None:
        settings["prefix_memory_mb"] = budget_mb
    params = FinetuneParams(**settings)
    started = time.perf_counter()
    result = finetune(
        backbone.model,
        [p for p, v in zip(paths, val, strict=True) if not v],
        labels[~val],
        [p for p, v in zip(paths, val, strict=True) if v],
        labels[val],
        eval_transform(backbone.data_config),
        backbone.data_config.input_size,
        params,
        "onnxruntime",
        scratch_dir=scratch,
    )
    report = {"seconds": time.perf_counter() - started, "prefix": result.prefix}
    print("RESULT " + json.dumps(report))


def measure(data: Path, images: int, budget_mb: float | None, scratch: Path) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        command = ["/usr/bin/time", "-f", "%M", "-o", rss.name, sys.executable, __file__]
        command += ["--child", str(data), "--images", str(images), "--scratch", str(scratch)]
        if budget_mb is not None:
            command += ["--budget-mb", str(budget_mb)]
        load = os.getloadavg()[0]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        peak_kb = int(Path(rss.name).read_text().split()[-1])
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    report = json.loads(line.removeprefix("RESULT "))
    return {
        "peak_rss_mb": round(peak_kb / 1024),
        "process_seconds": round(wall, 1),
        "finetune_seconds": round(report["seconds"], 1),
        "streamed": report["prefix"]["streamed"],
        "splits": report["prefix"]["splits"],
        "disk_mb_peak": report["prefix"]["disk_mb_peak"],
        "load_average_1m": round(load, 1),
    }


def _least(runs: list[dict]) -> dict:
    """The first run, with the least peak RSS and time of all, and every run's figures."""
    return {
        **runs[0],
        "peak_rss_mb": min(run["peak_rss_mb"] for run in runs),
        "finetune_seconds": min(run["finetune_seconds"] for run in runs),
        "process_seconds": min(run["process_seconds"] for run in runs),
        "each_peak_rss_mb": [run["peak_rss_mb"] for run in runs],
        "each_finetune_seconds": [run["finetune_seconds"] for run in runs],
        "load_average_1m": [run["load_average_1m"] for run in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--stream-mb", type=float, default=32.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", type=Path)
    parser.add_argument("--images", type=int)
    parser.add_argument("--budget-mb", type=float)
    parser.add_argument("--scratch", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.images, args.budget_mb, args.scratch)
        return
    from graft.config import FinetuneParams

    default = FinetuneParams.model_fields["prefix_memory_mb"].default
    budgets = {"in_memory": 1e6, "streamed": args.stream_mb, "default": default}
    repeats: dict[str, dict[str, list[dict]]] = {mode: {} for mode in budgets}
    with tempfile.TemporaryDirectory() as tmp:
        data, scratch = Path(tmp) / "data", Path(tmp) / "scratch"
        write_images(data, max(args.sizes))
        measure(data, max(args.sizes), None, scratch)  # warm-up: the images into the file cache
        for _ in range(args.repeats):
            for images in args.sizes:
                for mode, budget in budgets.items():  # interleaved: the load drifts alike
                    run = measure(data, images, budget, scratch)
                    repeats[mode].setdefault(str(images), []).append(run)
                    print(mode, images, run, flush=True)
    runs = {
        mode: {size: _least(measured) for size, measured in sizes.items()}
        for mode, sizes in repeats.items()
    }
    small, large = (str(size) for size in (min(args.sizes), max(args.sizes)))
    result = {
        "what": "graft.finetune.finetune peak RSS (/usr/bin/time -f %M, one process per run): "
        "test_efficientnet (random weights, 160 px), top2-frozen, 1 epoch, generated 64 px PNGs",
        "sizes": args.sizes,
        "budgets_mb": budgets,
        "repeats": args.repeats,
        "runs": runs,
        "rss_ratio_largest_over_smallest": {
            mode: round(runs[mode][large]["peak_rss_mb"] / runs[mode][small]["peak_rss_mb"], 2)
            for mode in budgets
        },
        "streamed_over_in_memory": {
            size: {
                "rss": round(
                    runs["streamed"][size]["peak_rss_mb"] / runs["in_memory"][size]["peak_rss_mb"],
                    2,
                ),
                "finetune_time": round(
                    runs["streamed"][size]["finetune_seconds"]
                    / runs["in_memory"][size]["finetune_seconds"],
                    2,
                ),
            }
            for size in runs["in_memory"]
        },
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
