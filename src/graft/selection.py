"""Choose the backbone by measurement: quick probes on cached features rank the candidates.

For each candidate of ``select.candidates`` (a timm name with any weight source), the train and
val images are embedded through the feature cache (:func:`graft.embedding.embed`), a
logistic-regression probe and a k-NN probe are fit on train and scored on val (test is never
looked at), and the backbone's cost is measured: forward time per image on the configured
engine, parameter count and size. The ranking orders by val accuracy (the better probe), then
by time per image. Choosing stays an explicit decision: :func:`backbone_change` says what to
change in ``params.yaml``, and :func:`apply_backbone` edits exactly those lines.
"""

from __future__ import annotations

import gc
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from graft.backbones import Backbone, create_backbone
from graft.config import BackboneCandidate, BackboneParams, Params, ParamsError, parse_params
from graft.data.manifest import read_manifest
from graft.embedding import embed, embedding_key
from graft.engines import make_runner
from graft.errors import InputError
from graft.feature_cache import FeatureCache
from graft.features import FeatureSet
from graft.files import write_json, write_text_atomic
from graft.paths import ProjectPaths
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
    input_size = backbone.data_config["input_size"]
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
    manifest: pd.DataFrame, data_dir: Path, params: Params, cache_dir: Path
) -> list[CandidateScore]:
    """Score every candidate on the usable train and val images; best first.

    Raises:
        SelectionError: if train or val has no usable images.
        WeightsError: if a candidate's weights cannot be had as asked.
    """
    usable = manifest[(manifest["status"] == "ok") & manifest["split"].isin(["train", "val"])]
    for split in ("train", "val"):
        if not (usable["split"] == split).any():
            raise SelectionError(
                f"no usable {split} images in the manifest: the probes are fit on train and "
                "scored on val. Raise data.val_fraction (or add images) and rerun `graft validate`."
            )
    labels = sorted(manifest.loc[manifest["status"] == "ok", "label"].unique())
    scores = []
    for candidate in params.select.candidates:
        print(f"select-backbone: {candidate.name} ({candidate.weights})")
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


def apply_backbone(params_path: Path, change: dict[str, Any]) -> bool:
    """Set the ``backbone`` keys of ``change`` in params.yaml, keeping every other byte.

    Each key's line is edited in place (its comment stays); a missing key is added at the end
    of the section. The result is parsed and compared with the original before it replaces
    the file (atomically): any difference outside ``backbone`` refuses the edit.

    Returns:
        Whether the file changed.

    Raises:
        SelectionError: if the file cannot be edited safely.
    """
    text = params_path.read_text(encoding="utf-8")
    before = yaml.safe_load(text) or {}
    has_block = any(_SECTION.match(line) for line in text.splitlines())
    if "backbone" in before and not has_block:
        raise SelectionError(
            f"{params_path}: the backbone section is not a block of `key: value` lines; set "
            f"backbone.{', backbone.'.join(change)} by hand."
        )
    edited = _edit_backbone_lines(text, change)
    try:
        after = yaml.safe_load(edited)
        parse_params(after, params_path)
    except (yaml.YAMLError, ParamsError) as exc:
        raise SelectionError(
            f"editing {params_path} would break it ({exc}); edit it by hand."
        ) from None
    section = before.get("backbone") or {}
    # An absent key that would be null stays absent (same meaning, fewer changed lines).
    wanted = {key: value for key, value in change.items() if value is not None or key in section}
    expected = {**before, "backbone": {**section, **wanted}}
    if after != expected:
        raise SelectionError(
            f"{params_path}: the backbone lines could not be edited on their own (unusual "
            f"layout); set backbone.{', backbone.'.join(change)} by hand."
        )
    if edited == text:
        return False
    write_text_atomic(params_path, edited)
    return True


_SECTION = re.compile(r"^backbone:\s*(#.*)?$")
_TOP_LEVEL = re.compile(r"^[^\s#]")


def _edit_backbone_lines(text: str, change: dict[str, Any]) -> str:
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if _SECTION.match(line.rstrip("\n"))), None)
    if start is None:
        block = "".join(
            f"  {key}: {_scalar(value)}\n" for key, value in change.items() if value is not None
        )
        return text + ("" if text.endswith("\n") or not text else "\n") + "backbone:\n" + block
    end = next((i for i in range(start + 1, len(lines)) if _TOP_LEVEL.match(lines[i])), len(lines))
    last_key, indent = start, "  "
    for key, value in change.items():
        pattern = re.compile(rf"^(\s+){re.escape(key)}:(\s*)([^#]*?)(\s*)(#.*)?$")
        for i in range(start + 1, end):
            body = lines[i].rstrip("\r\n")
            match = pattern.match(body)
            if match:
                lines[i] = _replace_value(match, key, value) + lines[i][len(body) :]
                last_key, indent = max(last_key, i), match.group(1)
                break
        else:
            if value is None:
                continue  # an absent key already means null
            lines.insert(last_key + 1, f"{indent}{key}: {_scalar(value)}\n")
            last_key, end = last_key + 1, end + 1
    return "".join(lines)


def _replace_value(match: re.Match, key: str, value: Any) -> str:
    indent, space, old, gap, comment = match.groups()
    head = f"{indent}{key}:{space or ' '}{_scalar(value)}"
    if not comment:
        return head
    column = len(f"{indent}{key}:{space}{old}{gap}")  # keep the comment where it was if possible
    return head + " " * max(1, column - len(head)) + comment


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n").removesuffix("\n...")


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

    from graft.report import _pyplot, _save_figure

    figure, axes = _pyplot().subplots(figsize=(6, 4))
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
    _save_figure(figure, dest)


def write_selection(
    report: dict[str, Any], scores: list[CandidateScore], reports_dir: Path, plots_dir: Path,
    applied: bool,
) -> None:  # fmt: skip
    write_json(reports_dir / "backbone_selection.json", {**report, "applied": applied})
    write_text_atomic(reports_dir / "backbone_selection.md", selection_markdown(report, applied))
    save_selection_plot(scores, plots_dir / "backbone_selection.png")


def run_selection(root: Path, params: Params, apply: bool) -> tuple[dict[str, Any], bool]:
    """``graft select-backbone``: rank the candidates, write the reports, apply if asked.

    Returns:
        The report and whether params.yaml was changed.
    """
    paths = ProjectPaths(root)
    manifest = read_manifest(paths.manifest)
    scores = rank_backbones(manifest, paths.data, params, paths.root / params.features.cache_dir)
    report = selection_report(scores, params.backbone)
    applied = False
    if apply and report["change_needed"]:
        applied = apply_backbone(paths.params, backbone_change(scores[0]))
    write_selection(report, scores, paths.root / "reports", paths.plots, applied)
    return report, applied
