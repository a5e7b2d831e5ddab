"""Benchmark: fine-tuning with the frozen prefix computed once vs. the whole network every epoch.

Both variants train the same top block + head of the real tf_efficientnet_lite0 on the same
sample images with the same seed; the ratio compares them in one process. Writes
bench/results/finetune_prefix_cache.json.

    python bench/finetune_prefix_cache.py [--images 128] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from graft.backbones import create_backbone
from graft.finetune import split_trunk
from graft.preprocessing import eval_transform, load_tensor_batch
from graft.sample_data import write_sample_data

RESULTS = Path(__file__).parent / "results" / "finetune_prefix_cache.json"


def trainable(model: nn.Module, unfreeze_blocks: int):
    model = model.eval().to(memory_format=torch.channels_last)
    split = split_trunk(model, unfreeze_blocks)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    params = [p for m in split.backbone_top + [split.head] for p in m.parameters()]
    for parameter in params:
        parameter.requires_grad_(True)
    return split, torch.optim.AdamW(params, lr=1e-5)


def epoch(step, inputs, labels, batch_size=32):
    for start in range(0, len(labels), batch_size):
        step(inputs[start : start + batch_size], labels[start : start + batch_size])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_sample_data(Path(tmp) / "data", per_class=-(-args.images // 10))
        paths = sorted((Path(tmp) / "data").rglob("*.png"))[: args.images]
        backbone = create_backbone("tf_efficientnet_lite0", "packaged", num_classes=10)
        images = load_tensor_batch(paths, eval_transform(backbone.data_config))
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([int(p.parent.name) for p in paths])
    loss_fn = nn.CrossEntropyLoss()
    initial = {k: v.clone() for k, v in backbone.model.state_dict().items()}

    def timed_run(use_cache: bool) -> dict:
        backbone.model.load_state_dict(initial)
        split, optimizer = trainable(backbone.model, 1)

        def step(x, y):
            optimizer.zero_grad()
            inputs = x if use_cache else split.prefix(x)
            loss_fn(split.top(inputs), y).backward()
            optimizer.step()

        start = time.perf_counter()
        inputs = images
        if use_cache:
            with torch.no_grad():
                inputs = torch.cat([split.prefix(chunk) for chunk in images.split(32)])
        setup = time.perf_counter() - start
        epochs = []
        for _ in range(args.epochs):
            t0 = time.perf_counter()
            epoch(step, inputs, labels)
            epochs.append(time.perf_counter() - t0)
        return {"setup_s": setup, "epoch_s": min(epochs), "total_s": setup + sum(epochs)}

    timed_run(True)  # warm-up: allocator, thread pools
    baseline, cached = timed_run(False), timed_run(True)
    result = {
        "what": "LP-FT of tf_efficientnet_lite0 (top block + head), frozen prefix cached vs not",
        "images": args.images,
        "epochs": args.epochs,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "baseline_full_forward": baseline,
        "prefix_cached": cached,
        "epoch_speedup": baseline["epoch_s"] / cached["epoch_s"],
        "total_speedup": baseline["total_s"] / cached["total_s"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
