"""Benchmark: inference latency of the exported classifier — torch eager, onnxruntime fp32 and
onnxruntime INT8 — at batch 1 and batch 32, on the same preprocessed sample images.

The model is the pipeline's: timm ``tf_efficientnet_lite0`` with the packaged ImageNet weights
and a 10-class head, exported by :func:`graft.export.export_onnx` and quantized by
:func:`graft.quantize.quantize_static_qdq` (static QDQ, calibrated on 64 sample images), exactly
as the export stage does. The engines are timed in interleaved rounds in one process, so a
noisy neighbour slows all of them alike; the figures are medians over rounds, and the ratios
are against torch eager measured in the same rounds. Writes bench/results/infer.json.

    python bench/infer.py [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from graft.backbones import create_backbone
from graft.export import export_onnx
from graft.preprocessing import eval_transform, load_tensor_batch
from graft.quantize import quantize_static_qdq
from graft.runtime import inference_session
from graft.sample_data import write_sample_data

RESULTS = Path(__file__).parent / "results" / "infer.json"
BATCHES = (1, 32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    backbone = create_backbone("tf_efficientnet_lite0", "packaged", num_classes=10)
    model = backbone.model.eval()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_sample_data(folder / "data", per_class=10)
        images = sorted((folder / "data").rglob("*.png"))
        pixels = load_tensor_batch(images, eval_transform(backbone.data_config))
        fp32, int8 = folder / "model.onnx", folder / "model.int8.onnx"
        export_onnx(model, backbone.data_config["input_size"], fp32, metadata={})
        quantize_static_qdq(fp32, int8, (pixels[i : i + 16].numpy() for i in range(0, 64, 16)))
        sessions = {"onnxruntime_fp32": inference_session(fp32, threads=args.threads)}
        sessions["onnxruntime_int8"] = inference_session(int8, threads=args.threads)

        def torch_eager(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(batch)).numpy()

        engines = {"torch_eager": torch_eager}
        for name, engine_session in sessions.items():
            engines[name] = lambda batch, s=engine_session: s.run(None, {"image": batch})[0]

        results: dict[str, dict] = {}
        for batch_size in BATCHES:
            batches = [
                pixels[i : i + batch_size].numpy()
                for i in range(0, min(len(pixels), 4 * batch_size), batch_size)
            ][: 8 if batch_size == 1 else 2]
            for engine in engines.values():  # warm-up at this batch size (arena growth)
                for batch in batches[:2]:
                    engine(batch)
            timings: dict[str, list[float]] = {name: [] for name in engines}
            for _ in range(args.rounds):
                for name, engine in engines.items():
                    for batch in batches:
                        start = time.perf_counter()
                        engine(batch)
                        timings[name].append(time.perf_counter() - start)
            baseline = statistics.median(timings["torch_eager"])
            results[f"batch_{batch_size}"] = {
                name: {
                    "median_ms": 1000 * statistics.median(samples),
                    "p90_ms": 1000 * float(np.percentile(samples, 90)),
                    "images_per_s": batch_size / statistics.median(samples),
                    "speedup_vs_torch_eager": baseline / statistics.median(samples),
                    "samples": len(samples),
                }
                for name, samples in timings.items()
            }
        agreement = float(
            (
                engines["onnxruntime_int8"](pixels.numpy()).argmax(1)
                == engines["onnxruntime_fp32"](pixels.numpy()).argmax(1)
            ).mean()
        )
        sizes = {"fp32_bytes": fp32.stat().st_size, "int8_bytes": int8.stat().st_size}

    payload = {
        "model": "tf_efficientnet_lite0 (packaged ImageNet weights) + 10-class head, 224 px",
        "images": len(images),
        "threads": args.threads,
        "rounds": args.rounds,
        "int8_top1_agreement_with_fp32": agreement,
        **sizes,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    for batch, row in results.items():
        print(
            batch,
            ", ".join(
                f"{name} {r['median_ms']:.1f} ms ({r['speedup_vs_torch_eager']:.1f}x)"
                for name, r in row.items()
            ),
        )


if __name__ == "__main__":
    main()
