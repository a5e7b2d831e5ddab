"""The train_head and finetune stages on a tiny project: errors before work, the fallback to the
head, the MLP head end to end, and the DVCLive curves that `dvc plots show` draws."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from graft.classifier import build_classifier, load_checkpoint
from graft.files import read_json
from graft.finetune import FinetuneError
from graft.stages import evaluate, features, finetune, train_head, validate
from tests.conftest import REPO_ROOT, write_params


def run_stages(paths, *stages) -> None:
    for stage in stages:
        stage.main(paths.root)


def test_a_schedule_the_backbone_cannot_follow_fails_before_any_work(tiny_project):
    run_stages(tiny_project, validate, features, train_head)
    write_params(tiny_project.root, {"finetune": {"unfreeze_blocks": [2, 7], "epochs": [1, 1]}})
    tiny_project.manifest.unlink()  # the stage must refuse before it reads anything else
    with pytest.raises(FinetuneError, match="finetune.unfreeze_blocks is 7, but the backbone"):
        finetune.main(tiny_project.root)
    assert not tiny_project.finetuned_model.exists()


def test_fine_tuning_that_does_not_beat_the_head_falls_back_to_it(tiny_project):
    write_params(tiny_project.root, {"finetune": {"lr": 1e-12, "epochs": 2}})
    run_stages(tiny_project, validate, features, train_head, finetune, evaluate)
    metrics = read_json(tiny_project.metrics / "finetune.json")
    assert metrics["candidate"] == "head" and metrics["best_epoch"] == 0
    assert metrics["val_accuracy"] == metrics["head_val_accuracy"]
    assert metrics["finetuned_val_accuracy"] is not None and metrics["epochs_run"] == 2
    evaluation = read_json(tiny_project.metrics / "eval.json")
    assert evaluation["candidate"] == "head"
    assert {"head", "finetuned"} <= set(evaluation)  # both reported, the choice made on val
    assert not list((tiny_project.finetuned_model.parent / "checkpoints").glob("*.pt"))


def test_an_mlp_head_is_trained_fine_tuned_and_its_curves_are_plotted(tiny_project):
    write_params(tiny_project.root, {"head": {"kind": "mlp", "hidden": 32}})
    run_stages(tiny_project, validate, features, train_head, finetune)
    model = build_classifier(load_checkpoint(tiny_project.finetuned_model))
    assert isinstance(model.get_classifier(), torch.nn.Sequential)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 160, 160)).shape == (2, 10)
    head_epochs = read_json(tiny_project.metrics / "head.json")["epochs_run"]
    root = tiny_project.root
    for stage, rows in (("train_head", head_epochs), ("finetune", 1 + 2)):
        curve = root / "dvclive" / stage / "plots" / "metrics" / "val" / "accuracy.tsv"
        assert len(curve.read_text().splitlines()) == 1 + rows, stage
    # `dvc plots show` renders both stages' curves from dvc.yaml's plot declarations.
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=root, check=True)
    shown = subprocess.run(
        [*dvc, "plots", "show", "--json"], cwd=root, check=True, capture_output=True, text=True
    )
    rendered = json.loads(shown.stdout)["data"]
    # Fine-tuning's epoch 0 is the head alone: a val accuracy, no training loss.
    expected = {
        ("train_head", "val/accuracy.tsv"): head_epochs,
        ("train_head", "train/loss.tsv"): head_epochs,
        ("finetune", "val/accuracy.tsv"): 3,
        ("finetune", "train/loss.tsv"): 2,
    }
    for (stage, name), rows in expected.items():
        (plot,) = rendered[f"dvclive/{stage}/plots/metrics/{name}"]
        assert len(plot["content"]["data"]["values"]) == rows, (stage, name)
