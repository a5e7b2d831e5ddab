"""Stage ``pretrain``: a source model on the source image folder, saved for a target pipeline.

Validates ``pretrain.source_dir`` with the same rules as the target data (``params.yaml``'s
``data`` section) into its own manifest under ``artifacts/source/`` (never anything under the
source folder), trains ``pretrain.architecture`` on the classes ``pretrain.classes`` and writes
``models/source/backbone.safetensors`` with its sidecar, and ``metrics/pretrain.json``.
"""

from __future__ import annotations

from pathlib import Path

from graft.config import load_params
from graft.data.manifest import write_manifest
from graft.files import write_json
from graft.paths import ProjectPaths
from graft.studies.pretrain import TrainingRun, pretrain, save_source_model, task_data
from graft.validate import validate

SOURCE_ARTIFACTS = Path("artifacts") / "source"
SOURCE_MODELS = Path("models") / "source"


def main(root: Path = Path(".")) -> TrainingRun:
    paths = ProjectPaths(Path(root))
    params = load_params(paths.params)
    settings = params.pretrain
    source_dir = paths.root / settings.source_dir
    result = validate(source_dir, params.data)
    write_manifest(result.manifest, paths.root / SOURCE_ARTIFACTS / "manifest.csv")
    write_json(paths.root / SOURCE_ARTIFACTS / "validation.json", result.summary)
    data = task_data(result.manifest, source_dir, settings.classes, "pretrain.classes")
    print(
        f"pretrain: {settings.architecture} from {settings.init} weights on {source_dir}/ "
        f"classes {data.labels} ({len(data.train)} train, {len(data.val)} val, "
        f"{len(data.test)} test images, {settings.image_size} px)"
    )
    run = pretrain(data, settings, params.features.engine)
    provenance = {
        "source_dir": settings.source_dir,
        "classes": data.labels,
        "images": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "init": settings.init,
        "training": settings.training.model_dump(mode="json"),
        "probe_val_accuracy": run.probe_val_accuracy,
        "val_accuracy": run.val_accuracy,
        "test_accuracy": run.test_accuracy,
        "best_epoch": run.best_epoch,
    }
    weights = save_source_model(
        run.model, settings.architecture, paths.root / SOURCE_MODELS, provenance
    )
    write_json(
        paths.metrics / "pretrain.json",
        {
            "probe_val_accuracy": run.probe_val_accuracy,
            "val_accuracy": run.val_accuracy,
            "test_accuracy": run.test_accuracy,
            "best_epoch": run.best_epoch,
            "seconds": round(run.seconds, 1),
            "stopped": run.stopped,
        },
    )
    print(
        f"pretrain: source val accuracy {run.val_accuracy:.4f} (probe on the initial weights "
        f"{run.probe_val_accuracy:.4f}), test {run.test_accuracy:.4f}, in {run.seconds:.0f} s; "
        f"saved {weights} — use it as backbone.weights: file:{weights.relative_to(paths.root)}"
    )
    return run
