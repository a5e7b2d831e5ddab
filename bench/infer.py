"""Benchmark: the exported classifier in onnxruntime, fp32 against INT8, on real images.

The models are a project's own exports: ``models/model.onnx`` and ``models/int8/model.onnx``
(run ``dvc repro`` first; the INT8 model must have been kept by the export gate). The images are
its test split, class-mixed by the calibration helper (``graft.quantize.calibration_sample``),
preprocessed once. Both engines run in interleaved rounds in one process, so a noisy neighbour
slows them alike; the figures are medians over rounds and the ratio is INT8 over fp32 measured
in the same rounds. A per-op profile of each model at batch 32 says where the time goes (which
ops run as int8 kernels, which stay float). Writes bench/results/infer.json with the CPU model
and the load average, which says how busy the machine was.

    python bench/infer.py [--project .] [--rounds 7] [--threads 2] [--images 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graft.data_config import DataConfig
from graft.export import read_metadata
from graft.features import load_feature_set
from graft.paths import ProjectPaths
from graft.preprocessing import eval_transform, load_tensor_batch
from graft.quantize import calibration_sample

RESULTS = Path(__file__).parent / "results" / "infer.json"
BATCHES = (1, 32)


def session(path: Path, threads: int, profile_dir: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_dir / path.parent.name)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_profile(path: Path, batch: np.ndarray, threads: int) -> dict[str, dict[str, float]]:
    """Share of kernel time and node count per op type over 4 runs of ``batch``."""
    with tempfile.TemporaryDirectory() as folder:
        profiled = session(path, threads, Path(folder))
        for _ in range(4):
            profiled.run(None, {"image": batch})
        events = json.loads(Path(profiled.end_profiling()).read_text())
    time_by_op, nodes = Counter(), {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            time_by_op[op] += event["dur"]
            nodes.setdefault(op, set()).add(event["name"])
    total = sum(time_by_op.values()) or 1
    return {
        op: {"time_share": round(spent / total, 4), "nodes": len(nodes[op])}
        for op, spent in time_by_op.most_common()
    }


def cpu_model() -> str:
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    paths = ProjectPaths(args.project)
    models = {
        "onnxruntime_fp32": paths.onnx_model,
        "onnxruntime_int8": paths.int8_dir / "model.onnx",
    }
    for path in models.values():
        if not path.is_file():
            raise SystemExit(
                f"{path} is missing: run `dvc repro` in {args.project} (the INT8 model exists "
                "only when the export gate kept it, see models/int8/decision.json)."
            )
    test = load_feature_set(paths.features / "test.npz")
    chosen = calibration_sample(test.labels, test.sha256, args.images)
    config = DataConfig.from_dict(read_metadata(paths.onnx_model)["preprocessing"])
    pixels = load_tensor_batch([paths.data / p for p in test.paths[chosen]], eval_transform(config))
    pixels = pixels.numpy()
    sessions = {name: session(path, args.threads) for name, path in models.items()}
    load_before = os.getloadavg()

    results: dict[str, dict] = {}
    for batch_size in BATCHES:
        batches = [
            np.ascontiguousarray(pixels[i : i + batch_size])
            for i in range(0, len(pixels) - batch_size + 1, batch_size)
        ][: 8 if batch_size == 1 else 2]
        for engine in sessions.values():  # warm-up at this batch size (arena growth)
            for batch in batches[:2]:
                engine.run(None, {"image": batch})
        timings: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(args.rounds):
            for name, engine in sessions.items():
                for batch in batches:
                    start = time.perf_counter()
                    engine.run(None, {"image": batch})
                    timings[name].append(time.perf_counter() - start)
        baseline = statistics.median(timings["onnxruntime_fp32"])
        results[f"batch_{batch_size}"] = {
            name: {
                "median_ms": round(1000 * statistics.median(samples), 2),
                "p90_ms": round(1000 * float(np.percentile(samples, 90)), 2),
                "images_per_s": round(batch_size / statistics.median(samples), 2),
                "speedup_vs_fp32": round(baseline / statistics.median(samples), 3),
                "samples": len(samples),
            }
            for name, samples in timings.items()
        }
    logits = {name: engine.run(None, {"image": pixels})[0] for name, engine in sessions.items()}
    labels = test.labels[chosen]
    profile_batch = np.ascontiguousarray(pixels[:32])

    payload = {
        "models": {name: str(path) for name, path in models.items()},
        "model_bytes": {name: path.stat().st_size for name, path in models.items()},
        "images": len(pixels),
        "images_per_class": np.bincount(labels).tolist(),
        "batch_sizes": list(BATCHES),
        "threads": args.threads,
        "rounds": args.rounds,
        "accuracy": {
            name: round(float((out.argmax(1) == labels).mean()), 4) for name, out in logits.items()
        },
        "int8_top1_agreement_with_fp32": round(
            float(
                (
                    logits["onnxruntime_int8"].argmax(1) == logits["onnxruntime_fp32"].argmax(1)
                ).mean()
            ),
            4,
        ),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "onnxruntime": ort.__version__,
            "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "results": results,
        "op_profile_batch_32": {
            name: op_profile(path, profile_batch, args.threads) for name, path in models.items()
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    for batch, row in results.items():
        print(
            batch,
            ", ".join(
                f"{name} {r['median_ms']:.1f} ms ({r['speedup_vs_fp32']:.2f}x)"
                for name, r in row.items()
            ),
        )


if __name__ == "__main__":
    main()
