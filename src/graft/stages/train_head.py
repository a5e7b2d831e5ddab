"""Stage ``train_head``: a linear head on the cached features of train, early-stopped on val."""

from __future__ import annotations

from pathlib import Path

from graft.classifier import Checkpoint, save_checkpoint
from graft.config import load_params
from graft.features import load_feature_set
from graft.files import write_json
from graft.head import HeadResult, train_linear_head
from graft.paths import ProjectPaths
from graft.stages.features import load_spec


def main(root: Path = Path(".")) -> HeadResult:
    paths = ProjectPaths(root)
    params = load_params(paths.params)
    spec = load_spec(paths)
    train = load_feature_set(paths.features / "train.npz")
    val = load_feature_set(paths.features / "val.npz")
    result = train_linear_head(
        train.features, train.labels, val.features, val.labels, len(spec.labels), params.head
    )
    info = {"best_epoch": result.best_epoch, "val_accuracy": result.val_accuracy}
    save_checkpoint(paths.head_model, Checkpoint(spec, "head", result.head.state_dict(), info))
    write_json(
        paths.metrics / "head.json",
        {
            "train_accuracy": result.train_accuracy,
            "val_accuracy": result.val_accuracy,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
        },
    )
    print(
        f"head: val accuracy {result.val_accuracy:.4f} (best epoch {result.best_epoch} "
        f"of {len(result.history)}), train accuracy {result.train_accuracy:.4f}"
    )
    return result
