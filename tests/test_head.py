"""The gradient-trained heads on feature vectors (linear and MLP): early stopping, the NaN stop,
the model files. The default head, the cross-validated probe, is tested in test_probe.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from graft.classifier import (
    Checkpoint,
    ModelSpec,
    build_classifier,
    build_head,
    load_checkpoint,
    save_checkpoint,
)
from graft.config import HeadParams
from graft.data_config import DataConfig
from graft.head import HeadError, train_head

TINY_CONFIG = DataConfig((3, 32, 32), "bicubic", 0.875, "center", (0.5,) * 3, (0.5,) * 3)


@pytest.fixture(scope="module")
def pixels() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as 64-value vectors: real data, separable enough for a probe."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return {"train": (x[:1200], y[:1200]), "val": (x[1200:1500], y[1200:1500])}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_the_head_learns_real_digits(pixels, kind):
    params = HeadParams(kind=kind, epochs=200, lr=0.01, patience=20)
    result = train_head(*pixels["train"], *pixels["val"], 10, params)
    assert result.val_accuracy > 0.9
    assert result.architecture["kind"] == kind
    assert isinstance(result.head, torch.nn.Linear) == (kind == "linear")


def test_early_stopping_ends_training_and_keeps_the_best_epoch(pixels):
    params = HeadParams(kind="linear", epochs=2000, lr=0.05, patience=5)
    seen = []
    result = train_head(*pixels["train"], *pixels["val"], 10, params, on_epoch=seen.append)
    assert len(result.history) == len(seen) < 2000
    best = max(result.history, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert result.best_epoch == best["epoch"] and result.val_accuracy == best["val_accuracy"]


def test_training_is_reproducible_with_the_seed(pixels):
    params = HeadParams(kind="mlp", epochs=30)
    first = train_head(*pixels["train"], *pixels["val"], 10, params)
    second = train_head(*pixels["train"], *pixels["val"], 10, params)
    for a, b in zip(
        first.head.state_dict().values(), second.head.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_a_nan_loss_stops_the_head_with_a_clear_message(pixels):
    x, y = pixels["train"]
    x = x.copy()
    x[3, 5] = np.nan
    with pytest.raises(HeadError, match="loss became nan in epoch 1: lower head.lr"):
        train_head(x, y, *pixels["val"], 10, HeadParams(kind="linear"))


def test_an_mlp_head_travels_through_its_model_files(tmp_path):
    spec = ModelSpec("test_efficientnet", "random", None, TINY_CONFIG, list("ab"))
    features = np.random.default_rng(0).normal(size=(40, 256)).astype(np.float32)
    labels = np.arange(40) % 2
    result = train_head(features, labels, features, labels, 2, HeadParams(kind="mlp", epochs=5))
    info = {"val_accuracy": result.val_accuracy, "head": result.architecture}
    save_checkpoint(tmp_path / "head.pt", Checkpoint(spec, "head", result.head.state_dict(), info))
    checkpoint = load_checkpoint(tmp_path / "head.pt")
    x = torch.from_numpy(features[:4])
    with torch.no_grad():
        expected = result.head(x)
        torch.testing.assert_close(build_head(checkpoint, 256)(x), expected)
        model = build_classifier(checkpoint)
        torch.testing.assert_close(model.get_classifier()(x), expected)
    full = Checkpoint(spec, "full", model.state_dict(), info)
    save_checkpoint(tmp_path / "full.pt", full)
    rebuilt = build_classifier(load_checkpoint(tmp_path / "full.pt"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images))


def test_the_same_checkpoint_saved_twice_has_the_same_bytes(tmp_path):
    """An identical re-run writes identical .pt files, so DVC re-runs nothing after them."""
    spec = ModelSpec("test_efficientnet", "random", None, TINY_CONFIG, list("ab"))
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 2)
    checkpoint = Checkpoint(spec, "head", head.state_dict(), {"val_accuracy": 0.5})
    (tmp_path / "a").mkdir()
    save_checkpoint(tmp_path / "a" / "head.pt", checkpoint)
    save_checkpoint(tmp_path / "head.pt", checkpoint)  # another temporary name beside it
    assert (tmp_path / "a" / "head.pt").read_bytes() == (tmp_path / "head.pt").read_bytes()


def test_learning_curves_are_logged_in_a_git_repository_without_a_commit(tmp_path, monkeypatch):
    """A fresh `git init` (no commit yet) is where many users first run the pipeline."""
    import json
    import subprocess
    import sys

    from graft.live_log import write_live_log

    subprocess.run(["git", "init", "--quiet"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--quiet"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    history = [{"epoch": 0, "train_loss": 1.0, "val_accuracy": 0.5}]
    history.append({"epoch": 1, "train_loss": 0.5, "val_accuracy": 0.75})
    write_live_log(tmp_path / "dvclive" / "head", history)
    metrics = json.loads((tmp_path / "dvclive" / "head" / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] == 0.75 and metrics["step"] == 1
    curve = tmp_path / "dvclive" / "head" / "plots" / "metrics" / "val" / "accuracy.tsv"
    assert curve.read_text().splitlines()[1:] == ["0\t0.5", "1\t0.75"]
