"""Benchmark: how each pipeline stage's wall time and peak memory grow with the number of images.

For each size, writes a generated image folder (10 classes tinted apart, sides 24 to 320 px,
PNG, JPEG and WebP, 1% bad files: empty or not an image; each file a function of its index,
written in a process per core) into a project with this checkout's code, dvc.yaml and
params.yaml, a tiny timm model (``test_efficientnet``, random weights, fed 64 px through a
weights file whose sidecar sets the input size) and one fine-tuning epoch, then runs
``dvc repro -s -f STAGE`` for each stage in order under ``/usr/bin/time``: the stage's wall time
and the peak resident memory of its largest process (the ``graft STAGE`` that DVC starts).
Reports per stage and size the seconds, the milliseconds per image and the peak RSS, and between
consecutive sizes the growth exponent of wall time (log t2/t1 over log n2/n1: 1.0 is linear;
start-up costs pull it below 1 at small sizes), the marginal milliseconds per added image and
the RSS ratio. The 1-minute load average is recorded beside each stage: figures taken on a
loaded machine are inflated. With ``--keep DIR`` the projects stay in DIR and a re-run reuses
their generated images (``generated.json`` says how many), so only the stages run again.
On the largest size, after the stages, ``graft validate`` runs again with one process (pinned to
one core by ``taskset``, so graft's pool has one worker) and with the default pool (one process
per core), alternating, ``--validate-repeats`` times each: the speed-up of the pool, with the CPU
seconds and the load average beside each run (``--validate-only``: that alone, on the kept
images; ``--realtime``: under round-robin real-time scheduling, so other sessions' load stays
out). Writes bench/results/scale.json and plots/scale.png (or ``--results``, ``--plot``).

    python bench/scale.py [--sizes 5000 20000 80000] [--keep DIR] [--append] [--validate-repeats 2]
        [--validate-only] [--realtime] [--results PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from graft.parallel import map_in_processes

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "scale.json"
PLOT = REPO / "plots" / "scale.png"
STAGES = ("validate", "features", "train_head", "finetune", "evaluate", "export")
SIDES = (24, 32, 48, 64, 96, 128, 160, 224, 320)
FORMATS = (("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"))
MODEL, INPUT_SIZE = "test_efficientnet", 64
WEIGHTS = "weights/backbone.safetensors"  # in each project: MODEL's random weights, 64 px input
MODEL_DESCRIPTION = f"{MODEL} (random weights, {INPUT_SIZE} px), 1 fine-tuning epoch, INT8 export"
PARAMS = {
    "data": {"max_class_imbalance": 10},
    "backbone": {"name": MODEL, "weights": f"file:{WEIGHTS}"},
    "pretrain": {"target_dep": WEIGHTS},  # a dependency of the stages that load the backbone
    "head": {"kind": "linear", "epochs": 100, "patience": 10},
    "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 32, "max_minutes": 30},
    "evaluate": {"min_accuracy": 0.0, "vs_probe": False},  # the bench measures cost, not quality
    "export": {"int8_calibration_images": 64},
}


def write_images(data: Path, count: int, seed: int = 0) -> dict[str, int]:
    """``count`` files in data/<class>/ (10 classes, each its own tint over noise); 1% bad.

    Each file is a function of ``(seed, index)`` alone, so the files are written in a process
    per core (:func:`graft.parallel.map_in_processes`) and come out the same on any machine.
    """
    tints = np.random.default_rng(seed).integers(40, 216, (10, 3))
    for label in range(10):
        (data / f"class_{label}").mkdir(parents=True, exist_ok=True)
    written = map_in_processes(
        functools.partial(write_image, data=data, seed=seed, tints=tints), range(count)
    )
    return dict(Counter(written))


def write_image(index: int, *, data: Path, seed: int, tints: np.ndarray) -> str:
    """File ``index`` of the generated folder; returns its kind (``bad`` or its suffix)."""
    label = index % 10
    folder = data / f"class_{label}"
    if index % 100 == 99:
        (folder / f"bad_{index:06d}.png").write_bytes(b"" if index % 200 == 199 else b"text")
        return "bad"
    rng = np.random.default_rng([seed, index])
    width, height = rng.choice(SIDES), rng.choice(SIDES)
    noise = rng.integers(-40, 40, (height // 4 + 1, width // 4 + 1, 3))
    pixels = np.clip(tints[label] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)
    file_format, suffix = FORMATS[index % len(FORMATS)]
    buffer = io.BytesIO()
    image.save(buffer, file_format)
    (folder / f"image_{index:06d}{suffix}").write_bytes(buffer.getvalue())
    return suffix


def make_project(root: Path, images: int) -> dict:
    """A DVC project at ``root``: this checkout's code, pipeline and params, the generated data.

    A folder already generated there with the same number of images (``generated.json``) is
    kept as it is (writing 80,000 images takes minutes); code, dvc.yaml and params.yaml are
    always this checkout's, and the embedding cache is emptied, so features always
    extracts. Returns the data's file mix and the seconds its generation took.
    """
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / ".graft", ignore_errors=True)  # the embedding cache: extraction runs cold
    shutil.rmtree(root / "src", ignore_errors=True)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in PARAMS.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_backbone(root / WEIGHTS)
    marker = root / "generated.json"
    generated = json.loads(marker.read_text()) if marker.is_file() else {}
    if generated.get("images") != images or generated.get("sides") != list(SIDES):
        shutil.rmtree(root / "data", ignore_errors=True)
        started = time.perf_counter()
        mix = write_images(root / "data", images)
        seconds = round(time.perf_counter() - started, 1)
        generated = {"images": images, "sides": list(SIDES), "files": mix, "seconds": seconds}
        marker.write_text(json.dumps(generated, indent=2) + "\n")
    if not (root / ".dvc").is_dir():
        for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
            subprocess.run(command, cwd=root, check=True)
        subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=root, check=True)
    return generated


def write_backbone(path: Path) -> None:
    """``test_efficientnet``'s seeded random weights with a sidecar setting its input to 64 px.

    The same tiny network as ``weights: random``, fed INPUT_SIZE px instead of its own 160 px:
    what the issue asks of the bench ("so it fits 2 cores"), through the file source's sidecar
    (:mod:`graft.backbones`) rather than a setting of its own.
    """
    if path.is_file():
        return
    from graft.backbones import create_backbone
    from graft.studies.pretrain import save_source_model, with_input_config

    backbone = create_backbone(MODEL, "random", num_classes=0)
    backbone = with_input_config(backbone, INPUT_SIZE, "bilinear", 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = save_source_model(
        backbone.model, MODEL, path.parent, {"source": "bench/scale.py: random weights"}
    )
    assert saved == path, (saved, path)


def run_stage(root: Path, stage: str) -> dict[str, float]:
    """``dvc repro -s -f STAGE`` under /usr/bin/time: wall seconds, peak RSS (MB)."""
    usage = root / f".time-{stage}"
    started = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(usage), "dvc", "repro", "-s", "-f", stage],
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


def validation_speedup(root: Path, repeats: int, realtime: bool = False) -> dict:
    """``graft validate`` on one core (one process) and on all (a process per core), alternating.

    Beside each run's wall seconds: its CPU seconds (user + system, its processes together) and
    the 1-minute load average. On a machine busy with other sessions the kernel shares the CPU
    between sessions (autogroup), so a run gets about one session's share however many
    processes it starts: the wall-time ratio then says little; the CPU seconds show the work.
    ``realtime``: each run under ``chrt -r 1`` (round-robin real-time scheduling, needs root),
    so that other sessions' load does not take its CPU; both variants alike.
    """
    cores = len(os.sched_getaffinity(0))
    seconds: dict[str, list[float]] = {"1": [], str(cores): []}
    cpu_seconds: dict[str, list[float]] = {"1": [], str(cores): []}
    loads = []
    for _ in range(repeats):
        for processes, pinned in (("1", ["taskset", "-c", "0"]), (str(cores), [])):
            prefix = ["chrt", "-r", "1", *pinned] if realtime else pinned
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            subprocess.run(
                [*prefix, "graft", "validate"], cwd=root, check=True, capture_output=True
            )
            seconds[processes].append(round(time.perf_counter() - started, 1))
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            cpu_seconds[processes].append(round(cpu, 1))
            loads.append(round(os.getloadavg()[0], 1))
    best = {processes: min(times) for processes, times in seconds.items()}
    return {
        "images": int(root.name.split("-")[-1]),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "load_average_1m": loads,
        "processes": cores,
        "realtime": realtime,
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
    parser.add_argument(
        "--keep",
        type=Path,
        help="build the projects here and keep them; a re-run reuses their generated images",
    )
    parser.add_argument("--append", action="store_true", help="add these sizes to the results'")
    parser.add_argument("--validate-repeats", type=int, default=2)
    parser.add_argument(
        "--validate-only",
        action="store_true",
        help="only the validation speed-up on the largest size (with --keep: its kept images), "
        "beside the stage figures already in the results",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="run each validation under chrt -r 1 (root): other sessions' load kept out",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--plot", type=Path, default=PLOT, help="where the figure goes")
    args = parser.parse_args()
    validation = None
    results = args.results
    kept = json.loads(results.read_text()) if results.exists() else {}
    runs = kept.get("runs", []) if args.append or args.validate_only else []
    # --validate-only keeps the stage figures, and so the model they were measured with.
    model = kept.get("model", MODEL_DESCRIPTION) if args.validate_only else MODEL_DESCRIPTION
    if not args.validate_only:
        runs = [run for run in runs if run["images"] not in args.sizes]
    with tempfile.TemporaryDirectory(prefix="graft-scale-") as tmp:
        base = args.keep or Path(tmp)
        root = base / f"images-{max(args.sizes)}"
        if args.validate_only:
            make_project(root, max(args.sizes))
        for images in [] if args.validate_only else sorted(args.sizes):
            root = base / f"images-{images}"
            generated = make_project(root, images)
            stages = {}
            for stage in STAGES:
                stages[stage] = run_stage(root, stage)
                print(f"{images} images: {stage} {stages[stage]}", flush=True)
            for figures in stages.values():
                figures["ms_per_image"] = round(1000 * figures["seconds"] / images, 2)
            runs.append(
                {
                    "images": images,
                    "files": generated["files"],
                    "generate_seconds": generated["seconds"],
                    "stages": stages,
                }
            )
            runs.sort(key=lambda run: run["images"])
            write_results(
                results, model, runs
            )  # after each size: a later failure keeps what was measured
        if args.validate_repeats:
            validation = validation_speedup(root, args.validate_repeats, args.realtime)
            print(f"validation, 1 process vs {validation['processes']}: {validation}", flush=True)
            write_results(results, model, runs, validation)
    if not args.validate_only:
        plot(runs, args.plot)
        print(json.dumps(growth_by_stage(runs), indent=2))


def growth_by_stage(runs: list[dict]) -> dict[str, list[dict[str, float]]]:
    return {stage: growth(runs, stage) for stage in STAGES}


def write_results(path: Path, model: str, runs: list[dict], validation: dict | None = None) -> None:
    figures = {
        "sizes": [run["images"] for run in runs],
        "model": model,
        "runs": runs,
        "growth": growth_by_stage(runs),
        "validation_processes": validation,
        "cpus": len(os.sched_getaffinity(0)),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
