"""Stage ``transfer``: the transfer-benefit report on the target data.

Reads the validated manifest (``artifacts/manifest.csv``) restricted to ``transfer.classes``,
trains the transferred backbone (``transfer.weights``) and the same architecture from random
weights with the same budget, once per seed (``transfer.seeds``), and writes
``reports/transfer.md``, ``reports/transfer.json``, ``metrics/transfer.json`` and the DVC plots
under ``plots/transfer/`` (CSV + PNG: the means over seeds and their spread).
"""

from __future__ import annotations

from pathlib import Path

from graft.backbones import Backbone, create_backbone
from graft.config import load_params
from graft.data.manifest import read_manifest
from graft.files import write_json, write_text_atomic
from graft.paths import ProjectPaths
from graft.studies.pretrain import load_sidecar, task_data, with_data_config
from graft.studies.transfer import (
    ARMS,
    TransferComparison,
    TransferError,
    compare_transfer,
    initialise_randomly,
    render_report,
)
from graft.studies.transfer_figures import (
    curve_csv,
    efficiency_csv,
    flat_metrics,
    save_curves_plot,
    save_efficiency_plot,
)

PLOTS = Path("plots") / "transfer"
COMMAND = "dvc repro transfer/dvc.yaml  # or: graft pretrain && graft transfer-report"


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
        initialise_randomly(scratch, architecture, seed)
        return with_data_config(scratch, transferred.data_config)

    comparison = compare_transfer(data, make_backbone, settings, params.features.engine)
    plot_dir = paths.root / PLOTS
    for arm in ARMS:
        write_text_atomic(plot_dir / f"curve_{arm}.csv", curve_csv(comparison, arm))
    write_text_atomic(plot_dir / "data_efficiency.csv", efficiency_csv(comparison))
    save_curves_plot(comparison, plot_dir / "curves.png")
    save_efficiency_plot(comparison, plot_dir / "data_efficiency.png")
    context = {
        "architecture": architecture,
        "weights": settings.weights,
        "weights_sha256": transferred.weights_sha256,
        "data_config": transferred.data_config.as_dict(),
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
    write_json(paths.metrics / "transfer.json", flat_metrics(summary))
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
