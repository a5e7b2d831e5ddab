"""Stage ``transfer``: the transfer-benefit report on the target data.

Reads the validated manifest (``artifacts/manifest.csv``) restricted to ``transfer.classes``,
trains the transferred backbone (``transfer.weights``) and the same architecture from random
weights with the same budget, and writes ``reports/transfer.md``, ``reports/transfer.json``,
``metrics/transfer.json`` and the DVC plots under ``plots/transfer/`` (CSV + PNG).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from graft.backbones import Backbone, create_backbone
from graft.config import load_params
from graft.data.manifest import read_manifest
from graft.errors import GraftError
from graft.files import replacing, write_json, write_text_atomic
from graft.paths import ProjectPaths
from graft.pretrain import load_sidecar, task_data, with_data_config
from graft.transfer import ARMS, TransferComparison, compare_transfer, render_report

PLOTS = Path("plots") / "transfer"
COMMAND = "dvc repro transfer/dvc.yaml  # or: graft pretrain && graft transfer-report"


class TransferError(GraftError):
    """The transfer report cannot run as configured."""


def main(root: Path = Path(".")) -> TransferComparison:
    paths = ProjectPaths(Path(root))
    params = load_params(paths.params)
    settings = params.transfer
    weights = settings.weights
    if weights.startswith("file:"):
        weights_file = paths.root / weights.removeprefix("file:")
        weights = f"file:{weights_file}"
        sidecar = load_sidecar(weights_file)
    else:
        sidecar = None
    architecture = settings.architecture or (sidecar or {}).get("architecture")
    if architecture is None:
        raise TransferError(
            f"transfer.architecture is not set and {settings.weights} has no sidecar naming one: "
            "set transfer.architecture in params.yaml."
        )
    manifest = read_manifest(paths.manifest)
    data = task_data(manifest, paths.data, settings.classes, "transfer.classes")
    transferred = create_backbone(architecture, weights, num_classes=0)

    def make_backbone(arm: str) -> Backbone:
        if arm == "transferred":
            return create_backbone(architecture, weights, num_classes=0)
        scratch = create_backbone(architecture, "random", num_classes=0)
        return with_data_config(scratch, transferred.data_config)

    comparison = compare_transfer(data, make_backbone, settings, params.features.engine)
    plot_dir = paths.root / PLOTS
    for arm in ARMS:
        write_text_atomic(plot_dir / f"curve_{arm}.csv", _curve_csv(comparison, arm))
    write_text_atomic(plot_dir / "data_efficiency.csv", _efficiency_csv(comparison))
    save_curves_plot(comparison, plot_dir / "curves.png")
    save_efficiency_plot(comparison, plot_dir / "data_efficiency.png")
    context = {
        "architecture": architecture,
        "weights": settings.weights,
        "weights_sha256": transferred.weights_sha256,
        "data_config": transferred.data_config,
        "labels": data.labels,
        "images": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "training": settings.training.model_dump(mode="json"),
        "source": (sidecar or {}).get("provenance"),
        "command": COMMAND,
        "plots": {
            "curves": f"../{PLOTS.as_posix()}/curves.png",
            "data_efficiency": f"../{PLOTS.as_posix()}/data_efficiency.png",
        },
    }
    report = render_report(comparison, context)
    write_text_atomic(paths.root / "reports" / "transfer.md", report)
    summary = comparison.summary()
    write_json(
        paths.root / "reports" / "transfer.json",
        {**summary, "runs": [vars(run) for run in comparison.runs], "context": context},
    )
    write_json(paths.metrics / "transfer.json", _metrics(summary))
    ahead = summary["ahead"]
    print(
        "transfer: transferred ahead on "
        + ", ".join(f"{name} {'yes' if value else 'NO'}" for name, value in ahead.items())
        + f"; report in {paths.root / 'reports' / 'transfer.md'}"
    )
    return comparison


def _metrics(summary: dict) -> dict:
    flat = {}
    for arm, figures in summary["figures"].items():
        for name, value in figures.items():
            flat[f"{arm}_{name}"] = value
    flat.update({f"ahead_{name}": value for name, value in summary["ahead"].items()})
    return flat


def _curve_csv(comparison: TransferComparison, arm: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["epoch", "seconds", "val_accuracy"])
    for record in comparison.run(arm).history:
        writer.writerow([record["epoch"], f"{record['seconds']:.2f}", record["val_accuracy"]])
    return buffer.getvalue()


def _efficiency_csv(comparison: TransferComparison) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer,
        fieldnames=["fraction", "train_images", "transferred", "scratch"],
        lineterminator="\n",
    )
    writer.writeheader()
    writer.writerows(comparison.data_efficiency())
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, dest: Path) -> None:
    figure.tight_layout()
    with replacing(dest) as temporary:
        figure.savefig(temporary, format="png", dpi=100, metadata={"Software": None})
    _pyplot().close(figure)


def save_curves_plot(comparison: TransferComparison, dest: Path) -> None:
    """Val accuracy against epochs (left) and against wall-clock seconds (right), both arms."""
    figure, (by_epoch, by_time) = _pyplot().subplots(1, 2, figsize=(10, 4), sharey=True)
    for arm in ARMS:
        history = comparison.run(arm).history
        accuracy = [r["val_accuracy"] for r in history]
        by_epoch.plot([r["epoch"] for r in history], accuracy, marker="o", label=arm)
        by_time.plot([r["seconds"] for r in history], accuracy, marker="o", label=arm)
    for axes in (by_epoch, by_time):
        axes.axhline(comparison.target_accuracy, color="grey", linestyle="--", linewidth=1)
        axes.set_ylim(0, 1.02)
        axes.grid(alpha=0.3)
    by_epoch.set(xlabel="epoch (0 = linear probe)", ylabel="val accuracy")
    by_time.set(xlabel="wall-clock seconds")
    by_epoch.legend(loc="lower right")
    figure.suptitle("Learning curves: transferred vs from scratch (dashed: target accuracy)")
    _save(figure, dest)


def save_efficiency_plot(comparison: TransferComparison, dest: Path) -> None:
    """Test accuracy against the share of the training split, both arms."""
    rows = comparison.data_efficiency()
    figure, axes = _pyplot().subplots(figsize=(5, 4))
    for arm in ARMS:
        axes.plot(
            [100 * r["fraction"] for r in rows], [r[arm] for r in rows], marker="o", label=arm
        )
    axes.set(xlabel="% of the training split", ylabel="test accuracy", ylim=(0, 1.02))
    axes.set_xscale("log")
    axes.set_xticks([100 * r["fraction"] for r in rows], [f"{r['fraction']:.0%}" for r in rows])
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title("Data efficiency")
    _save(figure, dest)
