"""The data-efficiency curve: test accuracy with k training images per class, over seeds.

For each k of ``kshot.k`` and each of ``kshot.seeds`` draws, k images per class are sampled from
train (all of a class's images when it has fewer: the report says so), the two few-shot heads
of :mod:`graft.fewshot` (cosine prototypes and the regularised probe) are fit on their cached
features, and both are scored on the whole test split. Nothing is embedded twice: the features
come from the cache, so the curve costs seconds.

The probe's strength ``fewshot.probe_c`` is a choice, so it is made on val, never on test: the
same draws fit the probe with each C of ``kshot.probe_c_grid`` and score it on the val split, and
the report gives the C val chooses at each k (one-standard-error rule) beside the one in use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from graft.errors import InputError
from graft.evaluate import bootstrap_accuracy_interval
from graft.features import FeatureSet
from graft.fewshot import LinearWeights, fit_probe, fit_prototypes
from graft.plotting import pyplot, save_figure

HEADS = ("prototype", "probe")


class KShotError(InputError):
    """The k-shot curve cannot be drawn from this data."""


def sample_k_per_class(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` images of each class (every image of a smaller class), sorted."""
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def _draws(labels: np.ndarray, k: int, seeds: int):
    """The train indices of each seed's draw of k per class: the same for every use of (k, seed)."""
    for seed in range(seeds):
        yield seed, sample_k_per_class(labels, k, np.random.default_rng([seed, k]))


def _accuracy(weights: LinearWeights | None, scored: FeatureSet) -> float:
    if weights is None:  # a single class drawn: no probe can be fit
        return 0.0
    return float((weights.logits(scored.features).argmax(axis=1) == scored.labels).mean())


def kshot_curve(
    train: FeatureSet,
    test: FeatureSet,
    num_classes: int,
    ks: list[int],
    seeds: int,
    probe_c: float,
) -> list[dict[str, Any]]:
    """Per k: each head's test accuracy per seed, with mean, standard deviation, min and max."""
    smallest = int(np.bincount(train.labels, minlength=num_classes).min())
    curve = []
    for k in ks:
        accuracies: dict[str, list[float]] = {head: [] for head in HEADS}
        for seed, index in _draws(train.labels, k, seeds):
            x, y = train.features[index], train.labels[index]
            accuracies["prototype"].append(_accuracy(fit_prototypes(x, y, num_classes), test))
            accuracies["probe"].append(_accuracy(_probe(x, y, num_classes, probe_c, seed), test))
        curve.append(
            {
                "k": k,
                "capped": k > smallest,  # some class has fewer than k train images
                "train_images_per_seed": int(len(index)),
                **{name: _spread(values) for name, values in accuracies.items()},
            }
        )
    return curve


def _probe(
    x: np.ndarray, y: np.ndarray, num_classes: int, c: float, seed: int
) -> LinearWeights | None:
    return fit_probe(x, y, num_classes, c, seed) if len(np.unique(y)) > 1 else None


def probe_c_on_val(
    train: FeatureSet,
    val: FeatureSet,
    num_classes: int,
    ks: list[int],
    seeds: int,
    grid: list[float],
) -> list[dict[str, Any]]:
    """Per k: the probe's mean val accuracy for each C of ``grid`` over the curve's draws.

    ``best_c`` has the highest mean; ``chosen_c`` is the smallest C (the strongest L2) whose mean
    is within one standard error of the best's (the one-standard-error rule): where val cannot
    tell two strengths apart, the more regularised probe is the safer one with few images.
    """
    table = []
    for k in ks:
        scores = {c: [] for c in grid}
        for seed, index in _draws(train.labels, k, seeds):
            x, y = train.features[index], train.labels[index]
            for c in grid:
                scores[c].append(_accuracy(_probe(x, y, num_classes, c, seed), val))
        means = {c: float(np.mean(values)) for c, values in scores.items()}
        best = max(grid, key=lambda c: (means[c], -c))
        error = float(np.std(scores[best], ddof=1) / np.sqrt(seeds)) if seeds > 1 else 0.0
        table.append(
            {
                "k": k,
                "val_accuracy": {f"{c:g}": m for c, m in means.items()},
                "best_c": best,
                "best_standard_error": error,
                "chosen_c": min(c for c in grid if means[c] >= means[best] - error),
            }
        )
    return table


def _spread(values: list[float]) -> dict[str, Any]:
    array = np.asarray(values)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "runs": [round(value, 6) for value in values],
    }


def kshot_report(
    curve: list[dict[str, Any]],
    test: FeatureSet,
    backbone: dict[str, Any],
    seeds: int,
    probe_c: float,
    probe_c_val: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    # What one run's accuracy could vary by from the test images alone (bootstrap, at 50%
    # accuracy, the widest): the spread across seeds should be read against it.
    coin = np.arange(len(test)) % 2
    low, high = bootstrap_accuracy_interval(coin, np.zeros_like(coin))
    return {
        "backbone": backbone,
        "seeds": seeds,
        "probe_c": probe_c,
        "test_images": len(test),
        "test_interval_width_at_50pct": high - low,
        "curve": curve,
        "probe_c_on_val": probe_c_val,  # None: no val images to choose C on
    }


def kshot_markdown(report: dict[str, Any]) -> str:
    rows = []
    for point in report["curve"]:
        cells = [
            f"{point[h]['mean']:.4f} ± {point[h]['std']:.4f} "
            f"({point[h]['min']:.3f}–{point[h]['max']:.3f})"
            for h in HEADS
        ]
        capped = " (capped: a class has fewer)" if point["capped"] else ""
        rows.append(
            f"| {point['k']}{capped} | {point['train_images_per_seed']} | "
            + " | ".join(cells)
            + " |"
        )
    backbone = report["backbone"]
    return "\n".join(
        [
            "# k-shot data efficiency",
            "",
            f"Backbone {backbone['name']} ({backbone['weights']}), frozen. For each k, "
            f"{report['seeds']} random draws of k train images per class; each head is fit on "
            f"their cached features and scored on all {report['test_images']} test images. "
            "Cells: mean ± standard deviation over the draws (min–max).",
            "",
            "| k per class | train images | prototypes (cosine) | "
            f"probe (logistic, L2, C = {report['probe_c']:g}) |",
            "|---|---|---|---|",
            *rows,
            "",
            f"With {report['test_images']} test images, one run's accuracy alone is uncertain by "
            f"up to ±{report['test_interval_width_at_50pct'] / 2:.3f} (95% bootstrap interval "
            "at 50% accuracy): do not over-read differences smaller than that.",
            "",
            *_probe_c_markdown(report),
            "![k-shot curve](../plots/kshot.png)",
            "",
        ]
    )


def _probe_c_markdown(report: dict[str, Any]) -> list[str]:
    table, in_use = report["probe_c_on_val"], report["probe_c"]
    heading = "## The probe's C, chosen on val"
    if table is None:
        return [heading, "", "No val images: `fewshot.probe_c` was not checked on val.", ""]
    grid = list(table[0]["val_accuracy"])
    rows = [
        f"| {row['k']} | "
        + " | ".join(
            f"**{row['val_accuracy'][c]:.4f}**"
            if float(c) == row["chosen_c"]
            else f"{row['val_accuracy'][c]:.4f}"
            for c in grid
        )
        + " |"
        for row in table
    ]
    disagree = [row["k"] for row in table if row["chosen_c"] != in_use]
    verdict = (
        f"Val chooses `fewshot.probe_c` = {in_use:g} at every k."
        if not disagree
        else f"Val chooses another C than `fewshot.probe_c` = {in_use:g} at k = "
        + ", ".join(str(k) for k in disagree)
        + "."
    )
    return [
        heading,
        "",
        "The same draws, the probe fit with each C of `kshot.probe_c_grid` and scored on the "
        "val split (mean over the draws). Test plays no part in this choice. Bold: the chosen "
        "C, the smallest within one standard error (over the draws) of the best mean: where "
        "val cannot tell them apart, the stronger regularisation.",
        "",
        "| k per class | " + " | ".join(f"C = {c}" for c in grid) + " |",
        "|---|" + "---|" * len(grid),
        *rows,
        "",
        verdict,
        "",
    ]


def save_kshot_plot(report: dict[str, Any], dest: Path) -> None:
    figure, axes = pyplot().subplots(figsize=(6, 4))
    ks = [point["k"] for point in report["curve"]]
    titles = {
        "prototype": "prototypes (cosine)",
        "probe": f"logistic probe (C = {report['probe_c']:g})",
    }
    for head in HEADS:
        means = np.array([point[head]["mean"] for point in report["curve"]])
        stds = np.array([point[head]["std"] for point in report["curve"]])
        lows = [point[head]["min"] for point in report["curve"]]
        highs = [point[head]["max"] for point in report["curve"]]
        line = axes.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=titles[head])
        axes.fill_between(ks, lows, highs, alpha=0.15, color=line[0].get_color())
    axes.set_xscale("log", base=2)
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.set_xlabel("training images per class (k)")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0, 1.02)
    backbone = report["backbone"]
    axes.set_title(
        f"{backbone['name']} ({backbone['weights']}): mean ± sd over {report['seeds']} draws"
    )
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    save_figure(figure, dest)
