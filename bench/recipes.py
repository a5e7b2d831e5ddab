"""Benchmark: each fine-tuning recipe run to its full schedule, val and test accuracy per epoch.

What ``finetune.recipes`` chooses between, measured beyond the trial: on a project where the
pipeline has run up to ``train_head`` (``dvc repro train_head``), each recipe (``top<N>-frozen``,
``top<N>-adapt``, ``+inv`` for the project's declared or given invariances) fine-tunes from the
head with the project's ``finetune.*`` (any key overridable) and is scored after every epoch on
val and on test. Test is looked at here only to judge the recipes and the trial rule, never by
the pipeline. Seconds are wall-clock on whatever the machine is doing (see ``load``).

With ``--ema-probes``, weight averages of the live weights (as ``finetune.ema_epochs`` keeps
them, one per time constant in epochs) ride along the same training and are scored on val and
test after every epoch too (``ema<E>_val_accuracy``): one run measures several time constants
against the live weights. Probes suit BatchNorm-frozen recipes (their statistics are not
recomputed).

Writes (merging by run name) ``runs`` of bench/results/recipes.json.

    python bench/recipes.py --project PATH top2-frozen top2-adapt top2-frozen+inv \\
        [--invariances hflip vflip rot90] [--set lr=0.003 ...] [--name SUFFIX] \\
        [--ema-probes 0.5 1 2 4] [--save-logits DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from timm.utils import ModelEmaV3
from torch.optim.optimizer import register_optimizer_step_post_hook

from graft.classifier import build_classifier, load_checkpoint
from graft.config import RECIPE_NAME, load_params
from graft.data.manifest import read_manifest, usable_rows
from graft.engines import make_runner
from graft.features import forward_in_batches
from graft.finetune import _Top, finetune, split_trunk
from graft.paths import ProjectPaths
from graft.preprocessing import eval_transform

RESULTS = Path(__file__).parent / "results" / "recipes.json"


def run_recipe(
    root: Path,
    recipe: str,
    invariances: list[str],
    overrides: dict,
    ema_probes: list[float],
    save_logits: Path | None = None,
    name: str = "",
) -> dict:
    paths = ProjectPaths(root)
    params = load_params(paths.params)
    blocks, bn = RECIPE_NAME.fullmatch(recipe.removesuffix("+inv")).groups()
    # The recipe alone, as finetune.recipes would run it (one phase of all the epochs).
    schedule = {"recipes": [], "unfreeze_blocks": int(blocks), "bn": bn}
    settings = type(params.finetune).model_validate(
        {**params.finetune.model_dump(), **overrides, **schedule}
    )
    settings = settings.model_copy(update={"epochs": sum(e for _, e in settings.phases)})
    head = load_checkpoint(paths.head_model)
    model = build_classifier(head)
    init = head.info.get("finetune_init")
    if init is not None:
        model.get_classifier().load_state_dict(init)
    spec = head.spec
    usable = usable_rows(read_manifest(paths.manifest))
    index_of = {label: i for i, label in enumerate(spec.labels)}

    def split_of(name: str):
        rows = usable[usable["split"] == name]
        labels = rows["label"].map(index_of).to_numpy(dtype=np.int64)
        return [paths.data / p for p in rows["path"]], labels

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = map(split_of, ("train", "val", "test"))
    transform = eval_transform(spec.data_config)
    cut = int(blocks)
    prefix = split_trunk(build_classifier(head).eval(), cut).prefix
    runner = make_runner(prefix, spec.data_config.input_size, 64, "onnxruntime")
    test_h = torch.from_numpy(forward_in_batches(runner, test_x, transform, 64, "test prefix"))
    val_h = torch.from_numpy(forward_in_batches(runner, val_x, transform, 64, "val prefix"))
    epochs, started = [], time.monotonic()
    # Weight averages of the live weights riding along (BatchNorm frozen recipes: their
    # statistics are not recomputed), each as finetune.ema_epochs would keep it: one run
    # measures several time constants on the same training trajectory.
    steps = math.ceil(len(train_y) / settings.batch_size)
    probes = {e: ModelEmaV3(model, decay=math.exp(-1.0 / (e * steps))) for e in ema_probes}
    hook = register_optimizer_step_post_hook(
        lambda *_: [probe.update(model) for probe in probes.values()]
    )

    def logits_of(trained, activations: torch.Tensor) -> np.ndarray:
        trained.eval()
        with torch.inference_mode():
            top = _Top(trained, cut, cut)
            return torch.cat([top(chunk) for chunk in activations.split(256)]).numpy()

    def accuracy_of(trained, activations: torch.Tensor, labels: np.ndarray) -> float:
        return round(float((logits_of(trained, activations).argmax(1) == labels).mean()), 4)

    def save_epoch_logits(scored, epoch: int) -> None:
        if save_logits is None:  # for studies of ensembles over runs and epochs
            return
        save_logits.mkdir(parents=True, exist_ok=True)
        np.savez(
            save_logits / f"{recipe}{name}_epoch{epoch}.npz",
            val=logits_of(scored, val_h),
            test=logits_of(scored, test_h),
            val_labels=val_y,
            test_labels=test_y,
        )

    def on_epoch(record: dict, scored) -> None:
        # scored: what the pipeline judges (the weight average when finetune.ema_epochs > 0);
        # model: the live weights, trained in place.
        epoch = {
            "epoch": record["epoch"],
            "val_accuracy": round(record["val_accuracy"], 4),
            "test_accuracy": accuracy_of(scored, test_h, test_y),
        }
        if scored is not model:
            epoch["live_val_accuracy"] = accuracy_of(model, val_h, val_y)
            epoch["live_test_accuracy"] = accuracy_of(model, test_h, test_y)
        for e, probe in probes.items():
            epoch[f"ema{e:g}_val_accuracy"] = accuracy_of(probe.module, val_h, val_y)
            epoch[f"ema{e:g}_test_accuracy"] = accuracy_of(probe.module, test_h, test_y)
        save_epoch_logits(scored, record["epoch"])
        epoch["seconds"] = round(time.monotonic() - started, 1)
        epoch["load"] = round(os.getloadavg()[0], 1)
        epochs.append(epoch)
        print(json.dumps(epoch), flush=True)

    save_epoch_logits(model, 0)  # the head (fit on train) that fine-tuning starts from
    result = finetune(
        model,
        train_x,
        train_y,
        val_x,
        val_y,
        transform,
        spec.data_config.input_size,
        settings,
        "onnxruntime",
        invariances=invariances if recipe.endswith("+inv") else [],
        on_epoch=on_epoch,
    )
    hook.remove()
    best = next((e for e in epochs if e["epoch"] == result.best_epoch), None)
    return {
        "recipe": recipe,
        "overrides": overrides,
        "ema_probes": ema_probes,
        "invariances": invariances if recipe.endswith("+inv") else [],
        "train_images": len(train_y),
        "val_images": len(val_y),
        "test_images": len(test_y),
        "stopped": result.stopped,
        "best_epoch_on_val": result.best_epoch,
        "val_accuracy": round(result.val_accuracy, 4),
        "test_accuracy_of_best_on_val": best["test_accuracy"] if best else None,
        "seconds": round(time.monotonic() - started, 1),
        "epochs": epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--invariances", nargs="*", default=None)
    parser.add_argument("--set", nargs="*", default=[], help="finetune keys, e.g. lr=0.003")
    parser.add_argument("--name", default="", help="a suffix for the run names")
    parser.add_argument(
        "--ema-probes",
        nargs="*",
        type=float,
        default=[],
        help="time constants in epochs of weight averages scored alongside, e.g. 0.5 1 2",
    )
    parser.add_argument(
        "--save-logits",
        type=Path,
        default=None,
        help="write each epoch's val and test logits to DIR/<recipe><name>_epoch<N>.npz",
    )
    args = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    invariances = args.invariances
    if invariances is None:
        invariances = list(load_params(ProjectPaths(args.project).params).data.invariances)
    for recipe in args.recipes:
        run = run_recipe(
            args.project,
            recipe,
            invariances or ["hflip", "vflip", "rot90"],
            overrides,
            args.ema_probes,
            args.save_logits,
            args.name,
        )
        # Read again now: another run of this script may have written its runs meanwhile.
        results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}}
        results["runs"][recipe + args.name] = run
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
