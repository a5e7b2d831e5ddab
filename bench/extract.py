"""Benchmark: graft's feature extraction against a plain timm torch-eager loop, same images.

Baseline: `model.eval()`, `torch.inference_mode()`, batch 32, NCHW — what one writes by hand.
graft: the engine `features.engine: auto` picks (onnxruntime on CPU), batch 64, and the
end-to-end rate including decoding and preprocessing. Ratios are taken in one process on the
same decoded images. Writes bench/results/extract.json.

    python bench/extract.py [--images 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from graft.backbones import create_backbone
from graft.engines import make_runner, resolve_engine
from graft.features import forward_in_batches
from graft.preprocessing import eval_transform, load_tensor_batch
from graft.sample_data import write_sample_data

RESULTS = Path(__file__).parent / "results" / "extract.json"


def best_rate(run, images: int, repeats: int) -> float:
    run()  # warm-up: allocator, thread pools, onnxruntime's arena at this batch size
    best = min(_timed(run) for _ in range(repeats))
    return images / best


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    backbone = create_backbone("tf_efficientnet_lite0", "packaged")
    transform = eval_transform(backbone.data_config)
    input_size = backbone.data_config["input_size"]
    with tempfile.TemporaryDirectory() as tmp:
        write_sample_data(Path(tmp) / "data", per_class=-(-args.images // 10))
        paths = sorted((Path(tmp) / "data").rglob("*.png"))[: args.images]
        decoded = load_tensor_batch(paths, transform)
        model = backbone.model.eval()

        def plain_timm_loop():
            with torch.inference_mode():
                for chunk in decoded.split(32):
                    model(chunk)

        baseline = best_rate(plain_timm_loop, len(paths), args.repeats)
        engine = resolve_engine("auto")
        runner = make_runner(model, input_size, 64, engine)
        graft_rate = best_rate(
            lambda: [runner(c) for c in decoded.split(64)], len(paths), args.repeats
        )
        end_to_end = best_rate(
            lambda: forward_in_batches(runner, paths, transform, 64, "bench"),
            len(paths),
            args.repeats,
        )
    result = {
        "what": "tf_efficientnet_lite0 pooled features, 224 px, same decoded sample images",
        "images": len(paths),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "engine": engine,
        "baseline_timm_eager_batch32_images_per_s": baseline,
        "graft_engine_batch64_images_per_s": graft_rate,
        "graft_end_to_end_with_decoding_images_per_s": end_to_end,
        "speedup_engine_vs_baseline": graft_rate / baseline,
        "speedup_end_to_end_vs_baseline": end_to_end / baseline,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
