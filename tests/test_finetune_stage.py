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
    # a few val images: the choice is made over half-splits of val, with its spread, and the
    # head (the probe refit on train + val) is judged by its out-of-fold logits, as shipped
    choice = metrics["candidates"]
    assert choice["val_images"] < 200 and choice["splits"] == 200
    assert choice["head_scored"] == "out of fold"
    assert set(choice["heldout_accuracy"]) == {"head", "finetuned", "average"}
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


def _val_logits(paths) -> tuple[torch.Tensor, torch.Tensor]:
    """The saved fine-tuned model's logits on the val images, and their labels."""
    from graft.data.manifest import read_manifest
    from graft.preprocessing import eval_transform, load_tensor_batch

    checkpoint = load_checkpoint(paths.finetuned_model)
    rows = read_manifest(paths.manifest).query("status == 'ok' and split == 'val'")
    images = [paths.data / p for p in rows["path"]]
    batch = load_tensor_batch(images, eval_transform(checkpoint.spec.data_config))
    with torch.no_grad():
        logits = build_classifier(checkpoint)(batch)
    labels = torch.tensor([checkpoint.spec.labels.index(label) for label in rows["label"]])
    return logits, labels


def test_the_fine_tuned_model_is_temperature_scaled_on_val_without_changing_a_prediction(
    tiny_project,
):
    # Strong label smoothing leaves the model unsure of itself: a temperature below 1 fixes it.
    tuning = {"finetune": {"label_smoothing": 0.4, "calibrate": False}}
    write_params(tiny_project.root, tuning)
    run_stages(tiny_project, validate, features, train_head, finetune)
    raw, labels = _val_logits(tiny_project)
    assert read_json(tiny_project.metrics / "finetune.json")["calibration"] is None

    tuning["finetune"]["calibrate"] = True
    write_params(tiny_project.root, tuning)
    finetune.main(tiny_project.root)  # the same seed and data: the same training
    calibration = read_json(tiny_project.metrics / "finetune.json")["calibration"]
    scaled, _ = _val_logits(tiny_project)
    temperature = calibration["temperature"]
    assert temperature < 0.9
    assert torch.allclose(scaled, raw / temperature, rtol=1e-4, atol=1e-4)  # folded in
    assert torch.equal(scaled.argmax(1), raw.argmax(1))  # accuracy cannot move
    loss = torch.nn.functional.cross_entropy
    assert float(loss(scaled, labels)) < float(loss(raw, labels))
    assert calibration["val_nll"] == pytest.approx(float(loss(scaled, labels)), rel=1e-3)
    assert calibration["val_nll_before"] == pytest.approx(float(loss(raw, labels)), rel=1e-3)
    # (ECE over 27 val images of a tiny random model is noise; the end-to-end run checks it.)

    evaluate.main(tiny_project.root)
    report = tiny_project.evaluation_report.read_text()
    assert f"divided by a temperature of {temperature:.3f}, fitted on val" in report


def test_with_fine_tuning_off_every_output_dvc_expects_of_the_stage_is_there(tiny_project):
    import yaml

    write_params(tiny_project.root, {"finetune": {"enabled": False}})
    run_stages(tiny_project, validate, features, train_head, finetune)
    declared = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["finetune"]
    entries = [e for key in ("outs", "metrics", "plots") for e in declared.get(key, [])]
    paths = [next(iter(e)) if isinstance(e, dict) else e for e in entries]
    missing = [p for p in paths if not (tiny_project.root / p).exists()]
    assert paths and not missing  # `dvc repro` would stop: "output ... does not exist"
    assert read_json(tiny_project.metrics / "finetune.json")["skipped"] is True


def test_each_recipe_trial_and_the_one_continued_are_in_the_metrics_and_the_report(tiny_project):
    recipes = {"recipes": ["top1-frozen", "top2-adapt"], "epochs": 2, "trial_epochs": 1}
    write_params(tiny_project.root, {"finetune": recipes})
    run_stages(tiny_project, validate, features, train_head, finetune, evaluate)
    metrics = read_json(tiny_project.metrics / "finetune.json")
    assert list(metrics["recipes"]) == ["top1-frozen", "top2-adapt"]
    for trial in metrics["recipes"].values():
        assert trial["epochs"] == 1 and trial["seconds"] > 0 and 0 <= trial["val_accuracy"] <= 1
    choice = metrics["recipe_choice"]
    assert metrics["recipe"] == choice["recipe"] and choice["default"] == "top1-frozen"
    assert metrics["epochs_run"] == 2 and metrics["bn"] == metrics["recipe"].split("-")[1]
    report = tiny_project.evaluation_report.read_text()
    assert "| `top1-frozen`" in report and "| `top2-adapt`" in report
    assert f"`{metrics['recipe']}` was continued to its full schedule" in report
    assert not list((tiny_project.finetuned_model.parent / "checkpoints").glob("*.pt"))
