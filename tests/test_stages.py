"""Each stage on a tiny project (real digits, a tiny random-weight timm model), as run by users."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from graft.backbones import create_backbone
from graft.classifier import build_classifier, load_checkpoint
from graft.config import load_params
from graft.export import ExportRefused, read_metadata
from graft.features import load_feature_set
from graft.files import read_json
from graft.finetune import FinetuneError
from graft.stages import evaluate, export, features, finetune, train_head, validate
from tests.conftest import write_params


def run_until(paths, last: str) -> None:
    for stage in (validate, features, train_head, finetune, evaluate, export):
        stage.main(paths.root)
        if stage.__name__.endswith(last):
            return


def test_features_hold_one_pooled_embedding_per_usable_image(tiny_project):
    run_until(tiny_project, "features")
    manifest = pd.read_csv(tiny_project.manifest, dtype=str)
    spec = read_json(tiny_project.features / "spec.json")
    assert spec["labels"] == [str(d) for d in range(10)]
    assert spec["data_config"]["input_size"] == [3, 160, 160]  # timm's config, not ours
    for split in ("train", "val", "test"):
        feature_set = load_feature_set(tiny_project.features / f"{split}.npz")
        expected = manifest[(manifest.split == split) & (manifest.status == "ok")]
        assert list(feature_set.paths) == list(expected.path)
        assert feature_set.features.shape == (len(expected), 256)
        assert np.isfinite(feature_set.features).all()
        assert [spec["labels"][i] for i in feature_set.labels] == list(expected.label)


def test_cached_features_equal_the_backbone_run_afresh(tiny_project):
    run_until(tiny_project, "features")
    train = load_feature_set(tiny_project.features / "train.npz")
    backbone = create_backbone("test_efficientnet", "random")
    from graft.preprocessing import eval_transform, load_tensor_batch

    batch = load_tensor_batch(
        [tiny_project.data / p for p in train.paths[:4]], eval_transform(backbone.data_config)
    )
    with torch.no_grad():
        fresh = backbone.model(batch).numpy()
    np.testing.assert_allclose(fresh, train.features[:4], atol=1e-4)


def test_head_and_finetune_report_val_accuracy_measured_the_same_way(tiny_project):
    run_until(tiny_project, "finetune")
    head_metrics = read_json(tiny_project.metrics / "head.json")
    finetune_metrics = read_json(tiny_project.metrics / "finetune.json")
    # Epoch 0 of fine-tuning is the head on the full network: it must score what the head
    # scored on cached features, or the cache and the model disagree.
    assert finetune_metrics["head_val_accuracy"] == pytest.approx(head_metrics["val_accuracy"])
    assert finetune_metrics["epochs_run"] == 2
    assert finetune_metrics["val_accuracy"] >= finetune_metrics["head_val_accuracy"]
    history = (tiny_project.plots / "finetune_history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,val_accuracy" and len(history) == 1 + 3
    model = build_classifier(load_checkpoint(tiny_project.finetuned_model))
    assert model.get_classifier().out_features == 10


def test_unfreezing_more_blocks_than_the_backbone_has_is_refused(tiny_project):
    write_params(tiny_project.root, {"finetune": {"unfreeze_blocks": 9}})
    run_until(tiny_project, "train_head")
    with pytest.raises(FinetuneError, match="unfreeze_blocks is 9, but the backbone has only 5"):
        finetune.main(tiny_project.root)


def test_skipped_finetuning_makes_the_head_the_candidate(tiny_project):
    write_params(tiny_project.root, {"finetune": {"enabled": False}})
    run_until(tiny_project, "evaluate")
    assert read_json(tiny_project.metrics / "finetune.json")["skipped"] is True
    eval_metrics = read_json(tiny_project.metrics / "eval.json")
    assert eval_metrics["candidate"] == "head" and "finetuned" not in eval_metrics
    assert "Fine-tuning was skipped" in tiny_project.evaluation_report.read_text()


def test_evaluate_reports_both_models_and_blesses_the_candidate(tiny_project):
    run_until(tiny_project, "evaluate")
    blessing = read_json(tiny_project.blessing)
    eval_metrics = read_json(tiny_project.metrics / "eval.json")
    assert blessing["passed"] is True and blessing["reasons"] == []
    assert set(eval_metrics) >= {"accuracy", "macro_f1", "head", "finetuned", "candidate"}
    test_size = len(load_feature_set(tiny_project.features / "test.npz"))
    confusion = pd.read_csv(tiny_project.plots / "confusion.csv", dtype=str)
    assert list(confusion.columns) == ["path", "actual", "predicted"]
    assert len(confusion) == test_size == eval_metrics["test_images"]
    accuracy = (confusion.actual == confusion.predicted).mean()
    assert accuracy == pytest.approx(eval_metrics["accuracy"])
    for plot in ("confusion.png", "reliability.png", "misclassified.png"):
        assert (tiny_project.plots / plot).stat().st_size > 1000, plot
    low, high = eval_metrics["accuracy_ci95_low"], eval_metrics["accuracy_ci95_high"]
    assert low <= eval_metrics["accuracy"] <= high
    assert 0.0 <= eval_metrics["ece"] <= 1.0
    report = tiny_project.evaluation_report.read_text()
    assert "| head |" in report and "| finetuned |" in report and "**blessed**" in report
    wrong = int((confusion.actual != confusion.predicted).sum())
    assert f"Misclassified test images ({wrong};" in report


def test_export_writes_a_checked_onnx_model_that_matches_the_evaluation(tiny_project):
    run_until(tiny_project, "export")
    onnx_path = tiny_project.onnx_model
    metadata = read_metadata(onnx_path)
    spec = read_json(tiny_project.features / "spec.json")
    assert metadata["labels"] == spec["labels"]
    assert metadata["preprocessing"] == spec["data_config"]
    assert metadata["backbone"] == "test_efficientnet"
    assert (
        metadata["metrics"]["accuracy"] == read_json(tiny_project.metrics / "eval.json")["accuracy"]
    )
    assert len(metadata["data_version"]) > 0 and "timestamp" not in json.dumps(metadata)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # dynamic batch axis
        (logits,) = session.run(None, {"image": np.zeros((batch, 3, 160, 160), np.float32)})
        assert logits.shape == (batch, 10)
    parity = read_json(tiny_project.metrics / "export.json")["parity"]
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_logit_diff"] <= 1e-3
    card = tiny_project.model_card.read_text()
    accuracy = read_json(tiny_project.metrics / "eval.json")["accuracy"]
    assert f"| {accuracy:.4f} |" in card and metadata["data_version"] in card
    assert "## Intended use" in card and "## Limitations" in card and "| 9 |" in card
    assert "randomly initialised" in card and "ImageNet" not in card  # weights: random
    assert parity["images"] == len(load_feature_set(tiny_project.features / "test.npz"))


def test_exporting_twice_gives_identical_bytes(tiny_project):
    run_until(tiny_project, "export")
    first = tiny_project.onnx_model.read_bytes()
    export.main(tiny_project.root)
    assert tiny_project.onnx_model.read_bytes() == first


def test_failing_gate_refuses_export_and_writes_no_model(tiny_project):
    write_params(tiny_project.root, {"evaluate": {"min_accuracy": 1.0}})
    run_until(tiny_project, "evaluate")
    blessing = read_json(tiny_project.blessing)
    assert blessing["passed"] is False
    assert any(
        "accuracy" in reason and "below the minimum" in reason for reason in blessing["reasons"]
    )
    with pytest.raises(ExportRefused, match="not blessed"):
        export.main(tiny_project.root)
    assert not tiny_project.onnx_model.exists()
    assert not list(tiny_project.onnx_model.parent.glob(".*.tmp"))


def test_failed_parity_leaves_the_previous_model_in_place(tiny_project):
    run_until(tiny_project, "export")
    good = tiny_project.onnx_model.read_bytes()
    write_params(tiny_project.root, {"export": {"parity_max_relative_logit": 1e-15}})
    assert load_params(tiny_project.params).export.parity_max_relative_logit == 1e-15
    with pytest.raises(ExportRefused, match="parity failed"):
        export.main(tiny_project.root)
    assert tiny_project.onnx_model.read_bytes() == good
    assert not list(tiny_project.onnx_model.parent.glob(".*.tmp"))


def test_stages_never_touch_the_data_folder(tiny_project):
    paths = tiny_project
    before = {p: p.read_bytes() for p in paths.data.rglob("*") if p.is_file()}
    run_until(paths, "export")
    after = {p: p.read_bytes() for p in paths.data.rglob("*") if p.is_file()}
    assert after == before
