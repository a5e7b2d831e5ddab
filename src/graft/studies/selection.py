"""Choose the backbone by measurement: quick probes on cached features rank the candidates.

For each candidate of ``select.candidates`` (a timm name with any weight source), the train and
val images are embedded through the feature cache (:func:`graft.embedding.embed`), a
logistic-regression probe and a k-NN probe are fit on train and scored on val (test is never
looked at), and the backbone's cost is measured: forward time per image on the configured
engine, parameter count and size. The ranking orders by val accuracy (the better probe), then
by time per image. Choosing stays an explicit decision: :func:`backbone_change` says what to
change in ``params.yaml``, and :func:`graft.params_editor.apply_backbone` edits exactly those
lines.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from graft.backbones import Backbone, create_backbone
from graft.config import BackboneCandidate, BackboneParams, Params
from graft.data.manifest import usable_labels, usable_rows
from graft.embedding import embed, embedding_key
from graft.engines import make_runner
from graft.errors import InputError
from graft.feature_cache import FeatureCache
from graft.features import FeatureSet
from graft.plotting import pyplot, save_figure
from graft.preprocessing import eval_transform, load_tensor_batch

BACKBONE_KEYS = ("name", "weights", "sha256")


class SelectionError(InputError):
    """The candidates cannot be compared, or params.yaml cannot be edited safely."""


@dataclass
class CandidateScore:
    """One candidate's probes and costs."""

    name: str
    weights: str
    sha256: str | None
    val_accuracy: float  # the better probe's
    best_probe: str
    logreg_val_accuracy: float
    knn_val_accuracy: float
    ms_per_image: float
    parameters: int
    size_mb: float
    feature_dim: int
    train_images: int
    val_images: int
    embedded_images: int  # computed now; the rest came from the cache
    rank: int = 0

    @property
    def label(self) -> str:
        return f"{self.name} ({self.weights})"


def probe_accuracies(
    train: FeatureSet, val: FeatureSet, knn_k: int, logreg_c: float, seed: int = 0
) -> dict[str, float]:
    """Val accuracy of a standardised logistic regression and of a cosine k-NN fit on train."""
    logreg = make_pipeline(
        StandardScaler(), LogisticRegression(C=logreg_c, max_iter=2000, random_state=seed)
    )
    knn = KNeighborsClassifier(n_neighbors=min(knn_k, len(train)), metric="cosine")
    with threadpool_limits(1):  # a few thousand rows: BLAS threads only contend
        return {
            name: float(probe.fit(train.features, train.labels).score(val.features, val.labels))
            for name, probe in (("logreg", logreg), ("knn", knn))
        }


def time_per_image(
    backbone: Backbone, images: list[Path], engine: str, onnx_path: Path | None, repeats: int = 3
) -> float:
    """Milliseconds per image of the backbone's forward pass on one batch of ``images``.

    Decoding is left out (it does not depend on the backbone); the engine is warmed at the batch
    size first, and the best of ``repeats`` runs counts (the least disturbed by other work).
    """
    batch = load_tensor_batch(images, eval_transform(backbone.data_config))
    input_size = backbone.data_config.input_size
    runner = make_runner(backbone.model, input_size, len(images), engine, onnx_path=onnx_path)
    runner(batch)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        runner(batch)
        best = min(best, time.perf_counter() - started)
    return 1000.0 * best / len(images)


def score_candidate(
    candidate: BackboneCandidate,
    rows: pd.DataFrame,
    data_dir: Path,
    params: Params,
    cache_dir: Path,
    labels: list[str],
) -> CandidateScore:
    """Embed train and val with ``candidate`` (through the cache), probe it and time it."""
    backbone = create_backbone(candidate.name, candidate.weights, expected_sha256=candidate.sha256)
    embedding = embed(
        rows, data_dir, backbone, params.features, cache_dir, labels=labels, precision="fp32"
    )
    train, val = embedding.feature_sets["train"], embedding.feature_sets["val"]
    probes = probe_accuracies(train, val, params.select.knn_k, params.select.logreg_c)
    best_probe = max(probes, key=probes.get)
    timed = [data_dir / path for path in train.paths[: params.select.timing_images]]
    cache = FeatureCache(cache_dir, embedding_key(backbone))
    cache.verified_engine()  # a corrupt engine file is removed (and exported again), not loaded
    ms = time_per_image(backbone, timed, params.features.engine, cache.onnx_path)
    state = backbone.model.state_dict().values()
    return CandidateScore(
        name=candidate.name,
        weights=candidate.weights,
        sha256=candidate.sha256,
        val_accuracy=probes[best_probe],
        best_probe=best_probe,
        logreg_val_accuracy=probes["logreg"],
        knn_val_accuracy=probes["knn"],
        ms_per_image=ms,
        parameters=sum(p.numel() for p in backbone.model.parameters()),
        size_mb=sum(t.numel() * t.element_size() for t in state) / 1e6,
        feature_dim=backbone.num_features,
        train_images=len(train),
        val_images=len(val),
        embedded_images=embedding.report.computed,
    )


def rank_backbones(
    manifest: pd.DataFrame,
    data_dir: Path,
    params: Params,
    cache_dir: Path,
    on_candidate: Callable[[BackboneCandidate], None] | None = None,
) -> list[CandidateScore]:
    """Score every candidate on the usable train and val images; best first.

    ``on_candidate`` is told of each candidate before it is scored (progress).

    Raises:
        SelectionError: if train or val has no usable images.
        WeightsError: if a candidate's weights cannot be had as asked.
    """
    usable = usable_rows(manifest, ["train", "val"])
    for split in ("train", "val"):
        if not (usable["split"] == split).any():
            raise SelectionError(
                f"no usable {split} images in the manifest: the probes are fit on train and "
                "scored on val. Raise data.val_fraction (or add images) and rerun `graft validate`."
            )
    labels = usable_labels(manifest)
    scores = []
    for candidate in params.select.candidates:
        if on_candidate:
            on_candidate(candidate)
        scores.append(score_candidate(candidate, usable, data_dir, params, cache_dir, labels))
        gc.collect()  # one candidate's model at a time
    scores.sort(key=lambda score: (-score.val_accuracy, score.ms_per_image))
    for rank, score in enumerate(scores, start=1):
        score.rank = rank
    return scores


# --- the decision -----------------------------------------------------------------------------


def is_current(score: CandidateScore, backbone: BackboneParams) -> bool:
    return (score.name, score.weights, score.sha256) == (
        backbone.name,
        backbone.weights,
        backbone.sha256,
    )


def backbone_change(score: CandidateScore) -> dict[str, Any]:
    """The ``backbone`` keys params.yaml needs to use ``score``'s backbone."""
    return {"name": score.name, "weights": score.weights, "sha256": score.sha256}


# --- reports ----------------------------------------------------------------------------------


def selection_report(scores: list[CandidateScore], backbone: BackboneParams) -> dict[str, Any]:
    best = scores[0]
    # Half the width of a 95% interval of the best val accuracy (normal approximation): a lead
    # smaller than this over the runner-up is not evidence that the best is better.
    p, n = best.val_accuracy, max(best.val_images, 1)
    noise = 1.96 * math.sqrt(max(p * (1 - p), 0.25 / n) / n)
    lead = best.val_accuracy - scores[1].val_accuracy if len(scores) > 1 else None
    return {
        "ranking": [asdict(score) for score in scores],
        "best": {"name": best.name, "weights": best.weights, "sha256": best.sha256},
        "current": backbone.model_dump(),
        "change_needed": not is_current(best, backbone),
        "lead_over_runner_up": lead,
        "val_noise_95": noise,
        "lead_within_noise": lead is not None and lead < noise,
    }


def selection_markdown(report: dict[str, Any], applied: bool) -> str:
    rows = [
        f"| {s['rank']} | {s['name']} | {s['weights']} | {s['val_accuracy']:.4f} "
        f"({s['best_probe']}) | {s['logreg_val_accuracy']:.4f} | {s['knn_val_accuracy']:.4f} | "
        f"{s['ms_per_image']:.2f} | {s['parameters'] / 1e6:.2f} M | {s['size_mb']:.1f} MB |"
        for s in report["ranking"]
    ]
    first = report["ranking"][0]
    best = report["best"]
    if not report["change_needed"]:
        decision = "params.yaml already uses the best candidate."
    elif applied:
        decision = f"Applied: params.yaml now uses {best['name']} ({best['weights']})."
    else:
        decision = (
            f"Not applied: params.yaml still uses {report['current']['name']} "
            f"({report['current']['weights']}). Run `graft select-backbone --apply` or edit "
            "backbone.name / backbone.weights by hand."
        )
    return "\n".join(
        [
            "# Backbone selection",
            "",
            f"Quick probes on frozen features: fit on train ({first['train_images']} images), "
            f"scored on val ({first['val_images']} images); test is not used. Time is the "
            "backbone's forward pass per image on the configured engine (best of 3, batch "
            "of train images, decoding excluded).",
            "",
            "| rank | backbone | weights | val accuracy | logistic | k-NN | ms / image | "
            "parameters | size |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"**Decision:** {decision}",
            "",
            *(
                [
                    f"**Within noise:** the best leads the runner-up by "
                    f"{report['lead_over_runner_up']:.4f}, less than the ±"
                    f"{report['val_noise_95']:.4f} a val accuracy on {first['val_images']} "
                    "images is uncertain by (95%): add val images, or weigh time and size."
                ]
                if report["lead_within_noise"]
                else []
            ),
            "",
            "![val accuracy against time per image](../plots/backbone_selection.png)",
            "",
        ]
    )


def save_selection_plot(scores: list[CandidateScore], dest: Path) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    figure, axes = pyplot().subplots(figsize=(6, 4))
    middle = np.median([score.ms_per_image for score in scores])
    for score in scores:
        axes.scatter(score.ms_per_image, score.val_accuracy, s=40)
        left = score.ms_per_image > middle  # labels point inwards, so none leaves the axes
        axes.annotate(
            f"{score.rank}. {score.label}",
            (score.ms_per_image, score.val_accuracy),
            textcoords="offset points",
            xytext=(-6 if left else 6, 6),
            ha="right" if left else "left",
            fontsize=8,
        )
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.margins(x=0.15)
    axes.set_xlabel("backbone time per image (ms, log scale)")
    axes.set_ylabel("val accuracy (best quick probe)")
    axes.set_ylim(0, 1.05)
    axes.set_title("Backbone candidates: accuracy against cost")
    axes.grid(alpha=0.3)
    save_figure(figure, dest)
