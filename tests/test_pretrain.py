"""Source models: `graft pretrain` trains and saves a backbone that a target pipeline loads back.

Tiny settings throughout: test_efficientnet, 32 px, one epoch, 12 real digits per class.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from graft.backbones import WeightsError, create_backbone, sidecar_path
from graft.cli import app
from graft.config import load_params
from graft.files import read_json
from graft.preprocessing import eval_transform, load_tensor_batch
from graft.stages import pretrain as pretrain_stage
from graft.studies.pretrain import PretrainError
from tests import test_flow as flow_tests
from tests.conftest import REPO_ROOT, make_project, write_params

TINY_PRETRAIN = {
    "pretrain": {
        "architecture": "test_efficientnet",
        "image_size": 32,
        "interpolation": "bicubic",  # not timm's default for the model: the sidecar must carry it
        "crop_pct": 0.9,
        "training": {"epochs": 1, "batch_size": 16},
    }
}


def tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    paths = make_project(tmp_path_factory.mktemp("pretrain") / "project", overrides=TINY_PRETRAIN)
    before = tree(paths.data)
    result = CliRunner().invoke(app, ["pretrain", "--root", str(paths.root)])
    assert result.exit_code == 0, result.output
    assert tree(paths.data) == before  # the source folder is read, never written
    return paths, paths.root / "models" / "source" / "backbone.safetensors"


def test_a_source_model_loads_as_a_backbone_with_its_preprocessing_and_hash(pretrained):
    paths, weights = pretrained
    sidecar = json.loads(sidecar_path(weights).read_text())
    assert sidecar["architecture"] == "test_efficientnet"
    assert sidecar["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sidecar["provenance"]["classes"] == ["0", "1", "2", "3", "4"]
    assert (paths.root / "artifacts" / "source" / "manifest.csv").is_file()
    metrics = read_json(paths.metrics / "pretrain.json")
    assert 0.0 <= metrics["val_accuracy"] <= 1.0

    backbone = create_backbone(
        "test_efficientnet", f"file:{weights}", expected_sha256=sidecar["sha256"]
    )
    assert backbone.weights_sha256 == sidecar["sha256"]
    config = backbone.data_config
    assert config.input_size == (3, 32, 32)
    assert config.interpolation == "bicubic"
    assert config.crop_pct == pytest.approx(0.9)
    assert list(config.mean) == sidecar["pretrained_cfg"]["mean"]
    # The file's tensors exactly, and nothing but the trunk (no classifier of the source task).
    saved = load_file(weights)
    loaded = backbone.model.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)
    # Its features: finite, one vector per image, at the saved input size.
    images = sorted((paths.data / "5").iterdir())[:4]
    batch = load_tensor_batch(images, eval_transform(config))
    assert batch.shape == (4, 3, 32, 32)
    with torch.no_grad():
        features = backbone.model(batch)
    assert features.shape == (4, backbone.num_features) and torch.isfinite(features).all()


def test_a_tampered_source_model_is_refused(pretrained, tmp_path):
    _, weights = pretrained
    copy = tmp_path / "backbone.safetensors"
    tensors = load_file(weights)
    tensors["conv_stem.weight"] = tensors["conv_stem.weight"] + 0.01
    save_file(tensors, str(copy))
    shutil.copy(sidecar_path(weights), sidecar_path(copy))
    with pytest.raises(WeightsError, match="changed or replaced after it was saved"):
        create_backbone("test_efficientnet", f"file:{copy}")


def test_a_source_model_of_another_architecture_is_refused(pretrained):
    _, weights = pretrained
    with pytest.raises(WeightsError, match="set backbone.name: test_efficientnet"):
        create_backbone("tf_efficientnet_lite0", f"file:{weights}")


def test_pretrain_refuses_a_class_the_source_folder_lacks(tmp_path):
    paths = make_project(tmp_path / "project")
    write_params(paths.root, {"pretrain": {**TINY_PRETRAIN["pretrain"], "classes": ["0", "x"]}})
    with pytest.raises(PretrainError, match=r"pretrain.classes names classes \['x'\]"):
        pretrain_stage.main(paths.root)
    assert not (paths.root / "models" / "source").exists()


def dvc(root: Path, *args: str) -> str:
    """dvc's output; its stages find `graft` in this interpreter's scripts folder."""
    return flow_tests.dvc(root, *args).stdout


@pytest.mark.slow  # about a minute: validate, pretrain and features through `dvc repro`
def test_retraining_the_source_model_makes_the_target_stages_out_of_date(tmp_path):
    source = {**TINY_PRETRAIN["pretrain"], "target_dep": "models/source"}
    paths = make_project(
        tmp_path / "project",
        overrides={
            "backbone": {
                "name": "test_efficientnet",
                "weights": "file:models/source/backbone.safetensors",
            },
            "pretrain": source,
        },
    )
    root = paths.root
    shutil.copy(REPO_ROOT / "dvc.yaml", root)
    shutil.copytree(REPO_ROOT / "transfer", root / "transfer")
    shutil.copytree(REPO_ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    dvc(root, "init", "--no-scm", "--quiet")
    dvc(root, "config", "core.analytics", "false")
    # The target's features stage pulls in the source model's stage.
    out = dvc(root, "repro", "features")
    assert "Running stage 'transfer/dvc.yaml:pretrain'" in out and "'features'" in out
    assert "features" not in dvc(root, "status", "features")
    first = (root / "models" / "source" / "backbone.safetensors").read_bytes()
    spec = json.loads((root / "artifacts" / "features" / "spec.json").read_text())
    assert spec["weights_sha256"] == hashlib.sha256(first).hexdigest()

    write_params(root, {**_target(), "pretrain": {**source, "training": {"epochs": 1, "seed": 1}}})
    assert load_params(root / "params.yaml").pretrain.training.seed == 1
    dvc(root, "repro", "transfer/dvc.yaml:pretrain")
    assert (root / "models" / "source" / "backbone.safetensors").read_bytes() != first
    status = dvc(root, "status")
    assert "features:" in status and "modified:           models/source" in status, status


def _target() -> dict:
    return {
        "backbone": {
            "name": "test_efficientnet",
            "weights": "file:models/source/backbone.safetensors",
        }
    }
