"""Stage ``train_head``: the head on the cached features (by default the cross-validated probe,
shipped refit on train + val; fine-tuning starts from its fit on train alone, kept in the
checkpoint's ``info["finetune_init"]``); its loss and val accuracy are logged with DVCLive
(``dvclive/train_head``)."""

from __future__ import annotations

from pathlib import Path

import torch

from graft.classifier import Checkpoint, read_spec, save_checkpoint
from graft.config import load_params
from graft.features import load_feature_set
from graft.files import write_json
from graft.head import HeadResult, train_head
from graft.live_log import write_live_log
from graft.paths import ProjectPaths


def main(root: Path = Path(".")) -> HeadResult:
    paths = ProjectPaths(root)
    params = load_params(paths.params)
    spec = read_spec(paths.features / "spec.json")
    mmap = params.head.kind == "probe" and not params.data.few_shot  # it reads a chunk at a time
    train = load_feature_set(paths.features / "train.npz", mmap=mmap)
    val = load_feature_set(paths.features / "val.npz", mmap=mmap)
    fit, settings = train_head, params.head
    if params.data.few_shot:  # prototypes or a regularised probe, chosen on held-out images
        from graft.fewshot import train_fewshot_head

        fit, settings = train_fewshot_head, params.fewshot
    result = fit(train.features, train.labels, val.features, val.labels, len(spec.labels), settings)
    info = {
        "best_epoch": result.best_epoch,
        "val_accuracy": result.val_accuracy,
        "head": result.architecture,
    }
    if result.refit is not None:  # fine-tuning starts from the fit on train (val stays unseen)
        info["finetune_init"] = {k: v.detach().clone() for k, v in result.head.state_dict().items()}
        info["probe"] = result.search
    if result.val_oof_logits is not None:  # the head's val scores for the choice of candidate
        info["val_oof_logits"] = torch.from_numpy(result.val_oof_logits)
    state = result.shipped.state_dict()
    save_checkpoint(paths.head_model, Checkpoint(spec, "head", state, info))
    write_json(
        paths.metrics / "head.json",
        {
            "kind": params.head.kind if not params.data.few_shot else result.architecture["kind"],
            "few_shot": result.architecture.get("few_shot"),
            "train_accuracy": result.train_accuracy,
            "val_accuracy": result.val_accuracy,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "probe": result.search,
        },
    )
    write_live_log(paths.root / "dvclive" / "train_head", result.history)
    kind = "probe fit on train" if result.search else result.architecture["kind"]
    if result.search is not None:
        search = result.search
        print(
            f"head (probe): C = {search['c']:g} by {search['folds']}-fold CV over "
            f"{search['images']} train+val images: {search['cv_accuracy']:.4f} "
            f"± {search['cv_std']:.4f}; shipped refit on train+val"
        )
        if search["at_grid_edge"]:
            print(
                f"head (probe): C = {search['c']:g} is the {search['at_grid_edge']} of "
                "head.c_grid: a C beyond it may do better; extend head.c_grid to see"
            )
    print(
        f"head ({kind}): val accuracy {result.val_accuracy:.4f} (best epoch "
        f"{result.best_epoch} of {len(result.history)}), train accuracy "
        f"{result.train_accuracy:.4f}"
    )
    return result
