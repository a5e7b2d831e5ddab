"""Benchmark: head training on 10,000 feature vectors, and fine-tuning throughput (torch, CPU).

Head: graft's full-batch head (``graft.head.train_head``, the default linear head and the MLP
option, with params.yaml's defaults) on ``--vectors`` vectors of tf_efficientnet_lite0's width
(1,280), 10 classes, drawn around class means; the baseline in the same process is
scikit-learn's ``LogisticRegression`` on the same vectors.

Fine-tuning: training steps (forward, backward, AdamW) of the real tf_efficientnet_lite0 with the
default schedule's top blocks trainable, BatchNorm frozen, batch 32, torch on the CPU: the
images/s of graft's way (frozen prefix cached, only the top runs) against the baseline of the
whole network running forward every step. Writes bench/results/train.json.

    python bench/train.py [--vectors 10000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from graft.backbones import create_backbone
from graft.config import load_params
from graft.finetune import split_trunk, trainable_names
from graft.head import train_head

RESULTS = Path(__file__).parent / "results" / "train.json"
PARAMS = Path(__file__).parents[1] / "params.yaml"


def feature_vectors(count: int, width: int = 1280, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, width)).astype(np.float32)
    labels = rng.integers(0, classes, count)
    vectors = means[labels] + 3.0 * rng.normal(size=(count, width)).astype(np.float32)
    return np.maximum(vectors, 0.0).astype(np.float32), labels  # post-ReLU-like, as pooled


def bench_head(count: int) -> dict:
    params = load_params(PARAMS).head
    x, y = feature_vectors(count + 2000)
    train, val = (x[:count], y[:count]), (x[count:], y[count:])
    figures = {}
    for kind in ("linear", "mlp"):
        start = time.perf_counter()
        result = train_head(*train, *val, 10, params.model_copy(update={"kind": kind}))
        figures[kind] = {
            "seconds": time.perf_counter() - start,
            "epochs_run": len(result.history),
            "val_accuracy": result.val_accuracy,
        }
    start = time.perf_counter()
    probe = LogisticRegression(max_iter=300).fit(*train)
    baseline = {"seconds": time.perf_counter() - start, "val_accuracy": probe.score(*val)}
    return {
        "vectors": count,
        "width": x.shape[1],
        "graft_head": figures,
        "baseline_sklearn_logistic_regression": baseline,
        "linear_speedup_vs_baseline": baseline["seconds"] / figures["linear"]["seconds"],
    }


def bench_finetune(images: int, blocks: int, batch_size: int = 32, steps: int = 4) -> dict:
    model = create_backbone("tf_efficientnet_lite0", "packaged", num_classes=10).model.eval()
    split = split_trunk(model, blocks)
    names = set(trainable_names(model, blocks))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    batch = torch.randn(batch_size, 3, 224, 224)
    labels = torch.randint(0, 10, (batch_size,))
    with torch.no_grad():
        cached = split.prefix(batch)

    def step(whole: bool) -> None:
        optimizer.zero_grad()
        if whole:
            with torch.no_grad():
                inputs = split.prefix(batch)
        else:
            inputs = cached
        loss_fn(split.top(inputs), labels).backward()
        optimizer.step()

    def images_per_s(whole: bool) -> float:
        step(whole)  # warm-up
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step(whole)
            times.append(time.perf_counter() - start)
        return batch_size / min(times)

    cached_rate, whole_rate = images_per_s(False), images_per_s(True)
    return {
        "model": "tf_efficientnet_lite0, 224 px",
        "trainable_top_blocks": blocks,
        "batch_size": batch_size,
        "images_per_s_prefix_cached": cached_rate,
        "baseline_images_per_s_whole_network_forward": whole_rate,
        "speedup": cached_rate / whole_rate,
        "note": "prefix cached: the top's training step only; graft also runs the frozen "
        "prefix once per image (onnxruntime), or once per epoch when augmenting",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vectors", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    blocks = max(b for b, _ in load_params(PARAMS).finetune.phases)
    result = {
        "what": "head training time on cached features; fine-tuning images/s (torch, CPU)",
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "head": bench_head(args.vectors),
        "finetune": bench_finetune(64, blocks),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
