"""The transfer study's outputs: DVC plot data (CSV), figures (PNG) and flat metrics."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from graft.plotting import pyplot, save_figure
from graft.studies.transfer import ARMS, TransferComparison


def flat_metrics(summary: dict) -> dict:
    """Flat metrics: each figure's mean (``<arm>_<figure>``) and std, the verdicts."""
    flat: dict = {"seeds": len(summary["seeds"])}
    for arm, figures in summary["figures"].items():
        for name, spread in figures.items():
            flat[f"{arm}_{name}"] = spread["mean"]
            flat[f"{arm}_{name}_std"] = spread["std"]
    flat.update({f"ahead_{name}": value for name, value in summary["ahead"].items()})
    flat.update(
        {f"beyond_spread_{name}": value for name, value in summary["beyond_spread"].items()}
    )
    return flat


CURVE_COLUMNS = ["epoch", "seconds", "val_accuracy", "val_accuracy_std", "val_accuracy_min"]
CURVE_COLUMNS += ["val_accuracy_max", "seconds_std", "runs"]
EFFICIENCY_COLUMNS = ["fraction", "train_images", "transferred", "scratch"]
EFFICIENCY_COLUMNS += [f"{arm}_{stat}" for arm in ARMS for stat in ("std", "min", "max")]


def curve_csv(comparison: TransferComparison, arm: str) -> str:
    """The mean learning curve over seeds (epoch, seconds, val_accuracy) and its spread."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CURVE_COLUMNS)
    for row in comparison.curve(arm):
        writer.writerow(
            [row["epoch"], f"{row['seconds']:.2f}"]
            + [f"{row[c]:.6f}" for c in CURVE_COLUMNS[2:-2]]
            + [f"{row['seconds_std']:.2f}", row["runs"]]
        )
    return buffer.getvalue()


def efficiency_csv(comparison: TransferComparison) -> str:
    """Test accuracy per share of train: the means (transferred, scratch) and their spread."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(EFFICIENCY_COLUMNS)
    for row in comparison.data_efficiency():
        writer.writerow(
            [row["fraction"], row["train_images"]]
            + [f"{row[c]:.6f}" for c in EFFICIENCY_COLUMNS[2:]]
        )
    return buffer.getvalue()


def save_curves_plot(comparison: TransferComparison, dest: Path) -> None:
    """Mean val accuracy against epochs (left) and against mean wall-clock seconds (right), both
    arms, with a band of ± one std over seeds."""
    figure, (by_epoch, by_time) = pyplot().subplots(1, 2, figsize=(10, 4), sharey=True)
    for arm in ARMS:
        curve = comparison.curve(arm)
        accuracy = [r["val_accuracy"] for r in curve]
        low = [r["val_accuracy"] - r["val_accuracy_std"] for r in curve]
        high = [r["val_accuracy"] + r["val_accuracy_std"] for r in curve]
        for axes, x in (
            (by_epoch, [r["epoch"] for r in curve]),
            (by_time, [r["seconds"] for r in curve]),
        ):
            (line,) = axes.plot(x, accuracy, marker="o", label=arm)
            axes.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    for axes in (by_epoch, by_time):
        axes.axhline(comparison.target_accuracy, color="grey", linestyle="--", linewidth=1)
        axes.set_ylim(0, 1.02)
        axes.grid(alpha=0.3)
    by_epoch.set(xlabel="epoch (0 = linear probe)", ylabel="val accuracy")
    by_time.set(xlabel="wall-clock seconds")
    by_epoch.legend(loc="lower right")
    figure.suptitle(
        f"Learning curves: transferred vs from scratch, mean ± std over "
        f"{len(comparison.seeds)} seeds (dashed: target accuracy)"
    )
    save_figure(figure, dest)


def save_efficiency_plot(comparison: TransferComparison, dest: Path) -> None:
    """Mean test accuracy against the share of the training split, both arms, ± one std."""
    rows = comparison.data_efficiency()
    figure, axes = pyplot().subplots(figsize=(5, 4))
    for arm in ARMS:
        axes.errorbar(
            [100 * r["fraction"] for r in rows],
            [r[arm] for r in rows],
            yerr=[r[f"{arm}_std"] for r in rows],
            marker="o",
            capsize=3,
            label=arm,
        )
    axes.set(xlabel="% of the training split", ylabel="test accuracy", ylim=(0, 1.02))
    axes.set_xscale("log")
    axes.set_xticks([100 * r["fraction"] for r in rows], [f"{r['fraction']:.0%}" for r in rows])
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(f"Data efficiency (mean ± std, {len(comparison.seeds)} seeds)")
    save_figure(figure, dest)
