"""``backbone.name: auto``: the backbone chosen by measurement, within a time budget.

Each of ``backbone.auto_candidates`` (the packaged EfficientNet-Lite0/1/2 by default, cheapest
first) embeds the train and val images through the feature cache, and a quick probe scores it:
a standardised logistic regression (``select.logreg_c``) by stratified 5-fold cross-validation
over train + val, every image scored out of fold. The best mean accuracy wins; a tie goes to the
cheaper (earlier) candidate, and the report says whether the winner's lead over each rival is
within noise (a paired bootstrap over the images). Before embedding a candidate its forward
time is measured on a few images: one whose estimated embedding time would overrun
``backbone.auto_max_minutes`` (the first candidate always runs) is skipped, and said so. The
winner's train and val embeddings are then in the cache: the features stage reuses them.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from graft.backbones import create_backbone
from graft.config import Params
from graft.embedding import embed, embedding_key
from graft.engines import make_runner
from graft.evaluate import choose_candidate
from graft.feature_cache import FeatureCache
from graft.preprocessing import eval_transform, load_tensor_batch
from graft.probe import out_of_fold_logits

TIMING_IMAGES = 16


def probe_out_of_fold(features: np.ndarray, labels: np.ndarray, c: float) -> np.ndarray:
    """Whether each image is predicted right by graft's standardised probe fit on the other
    folds (stratified 5-fold, fixed seed: :func:`graft.probe.out_of_fold_logits`)."""
    num_classes = int(labels.max()) + 1
    logits = out_of_fold_logits(features, labels, num_classes, c, standardize=True)
    return logits.argmax(axis=1) == labels


def choose_backbone(
    rows: pd.DataFrame, data_dir, params: Params, cache_dir, labels: list[str]
) -> dict[str, Any]:
    """Rank ``backbone.auto_candidates`` on the usable train and val ``rows``; the winner's
    name is ``chosen``, each candidate's figures are in ``ranking`` (best first)."""
    settings = params.backbone
    budget_s = settings.auto_max_minutes * 60
    pool = rows[rows["split"].isin(["train", "val"])]
    started = time.perf_counter()
    scored, skipped, correct = [], [], {}
    for name in settings.auto_candidates:
        backbone = create_backbone(name, settings.weights)
        cache = FeatureCache(cache_dir, embedding_key(backbone, "fp32"))
        timed = [data_dir / p for p in pool["path"].iloc[:TIMING_IMAGES]]
        ms = _ms_per_image(backbone, timed, params)
        missing = len(pool) - len(cache.load(dict(zip(pool["sha256"], pool["path"], strict=True))))
        estimate = missing * ms / 1000
        elapsed = time.perf_counter() - started
        if scored and elapsed + estimate > budget_s:
            skipped.append(
                {"name": name, "ms_per_image": ms, "estimated_seconds": round(estimate, 1)}
            )
            print(
                f"features (auto): {name} skipped: about {estimate:.0f} s to embed {missing} "
                f"images would overrun backbone.auto_max_minutes ({settings.auto_max_minutes})"
            )
            continue
        begun = time.perf_counter()
        embedding = embed(pool, data_dir, backbone, params.features, cache_dir, labels=labels,
                          precision="fp32")  # fmt: skip
        sets = embedding.feature_sets
        features = np.concatenate([sets["train"].features, sets["val"].features])
        y = np.concatenate([sets["train"].labels, sets["val"].labels])
        correct[name] = probe_out_of_fold(features, y, params.select.logreg_c)
        scored.append(
            {
                "name": name,
                "cv_accuracy": float(correct[name].mean()),
                "images": int(len(y)),
                "ms_per_image": ms,
                "feature_dim": int(features.shape[1]),
                "embedded_images": embedding.report.computed,
                "seconds": round(time.perf_counter() - begun, 1),
            }
        )
        print(
            f"features (auto): {name}: probe accuracy {correct[name].mean():.4f} by 5-fold CV "
            f"over {len(y)} train+val images, {ms:.1f} ms/image"
        )
    choice = choose_candidate(correct, order=[s["name"] for s in scored])
    ranking = sorted(
        scored, key=lambda s: (-round(s["cv_accuracy"], 12), list(correct).index(s["name"]))
    )
    return {
        "chosen": choice["candidate"],
        "ranking": ranking,
        "skipped": skipped,
        "difference_ci95": choice["difference_ci95"],
        "within_noise": choice["within_noise"],
        "seconds": round(time.perf_counter() - started, 1),
        "budget_minutes": settings.auto_max_minutes,
    }


def _ms_per_image(backbone, images, params: Params) -> float:
    """Milliseconds per image of the backbone's forward pass on the configured engine (the best
    of three runs after a warm-up; decoding left out), through a temporary export: the cache's
    engine file is the embedding's to write, with its recorded sha256."""
    batch = load_tensor_batch(images, eval_transform(backbone.data_config))
    runner = make_runner(
        backbone.model,
        backbone.data_config.input_size,
        len(images),
        params.features.engine,
    )
    runner(batch)
    best = float("inf")
    for _ in range(3):
        begun = time.perf_counter()
        runner(batch)
        best = min(best, time.perf_counter() - begun)
    return round(1000 * best / max(len(images), 1), 2)
