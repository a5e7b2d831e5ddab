"""Stage ``transfer``: the transfer-benefit report on the target data.

Reads the validated manifest (``artifacts/manifest.csv``) restricted to ``transfer.classes``,
trains the transferred backbone (``transfer.weights``) and the same architecture from random
weights with the same budget, once per seed (``transfer.seeds``), and writes
``reports/transfer.md``, ``reports/transfer.json``, ``metrics/transfer.json`` and the DVC plots
under ``plots/transfer/`` (CSV + PNG: the means over seeds and their spread).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import timm
import torch

from graft.backbones import Backbone, create_backbone
from graft.config import load_params
from graft.data.manifest import read_manifest
from graft.errors import InputError
from graft.files import replacing, write_json, write_text_atomic
from graft.paths import ProjectPaths
from graft.pretrain import load_sidecar, task_data, with_data_config
from graft.transfer import ARMS, TransferComparison, compare_transfer, render_report

PLOTS = Path("plots") / "transfer"
COMMAND = "dvc repro transfer/dvc.yaml  # or: graft pretrain && graft transfer-report"


class TransferError(InputError):
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

    def make_backbone(arm: str, seed: int) -> Backbone:
        if arm == "transferred":
            return create_backbone(architecture, weights, num_classes=0)
        scratch = create_backbone(architecture, "random", num_classes=0)
        _initialise(scratch, architecture, seed)
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
    ahead, beyond = summary["ahead"], summary["beyond_spread"]
    print(
        f"transfer: over {len(comparison.seeds)} seeds, transferred ahead on the means: "
        + ", ".join(
            f"{name} {'yes' if value else 'NO'}"
            + (f" ({'beyond' if beyond[name] else 'within'} the spread)" if value else "")
            for name, value in ahead.items()
        )
        + f"; report in {paths.root / 'reports' / 'transfer.md'}"
    )
    return comparison


def _initialise(backbone: Backbone, architecture: str, seed: int) -> None:
    """Re-draw the random weights of ``backbone`` from ``seed`` (timm's own initialisation).

    ``create_backbone(..., "random")`` always draws with seed 0; the scratch arm's initialisation
    is part of its seed-to-seed spread, so each seed gets its own.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = timm.create_model(architecture, pretrained=False, num_classes=0)
    backbone.model.load_state_dict(fresh.state_dict())


def _metrics(summary: dict) -> dict:
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


def _curve_csv(comparison: TransferComparison, arm: str) -> str:
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


def _efficiency_csv(comparison: TransferComparison) -> str:
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
    """Mean val accuracy against epochs (left) and against mean wall-clock seconds (right), both
    arms, with a band of ± one std over seeds."""
    figure, (by_epoch, by_time) = _pyplot().subplots(1, 2, figsize=(10, 4), sharey=True)
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
    _save(figure, dest)


def save_efficiency_plot(comparison: TransferComparison, dest: Path) -> None:
    """Mean test accuracy against the share of the training split, both arms, ± one std."""
    rows = comparison.data_efficiency()
    figure, axes = _pyplot().subplots(figsize=(5, 4))
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
    _save(figure, dest)
