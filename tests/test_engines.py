"""The two engines that run frozen modules give the same numbers on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from graft.backbones import create_backbone
from graft.engines import (
    OnnxRunner,
    TorchRunner,
    activation_bytes_per_image,
    export_engine,
    make_runner,
    resolve_engine,
    rows_for_budget,
)
from graft.features import forward_in_batches
from graft.finetune import split_trunk
from graft.preprocessing import eval_transform, load_tensor_batch
from graft.runtime import slice_rows
from graft.sample_data import write_sample_data


@pytest.fixture(scope="module")
def digit_paths(tmp_path_factory) -> list[Path]:
    data = tmp_path_factory.mktemp("engines") / "data"
    write_sample_data(data, per_class=2)
    return sorted(data.rglob("*.png"))


def embed(backbone, paths, engine: str):
    size = backbone.data_config.input_size
    runner = make_runner(backbone.model, size, 8, engine)
    return forward_in_batches(runner, paths, eval_transform(backbone.data_config), 8, engine)


def test_auto_means_onnxruntime_on_cpu_and_torch_on_cuda():
    expected = "torch" if torch.cuda.is_available() else "onnxruntime"
    assert resolve_engine("auto") == expected
    assert resolve_engine("torch") == "torch"


def test_engines_agree_on_embeddings_of_real_images(digit_paths):
    backbone = create_backbone("test_efficientnet", "random")
    by_engine = {
        engine: embed(backbone, digit_paths, engine) for engine in ("torch", "onnxruntime")
    }
    assert by_engine["torch"].shape == (len(digit_paths), backbone.num_features)
    np.testing.assert_allclose(by_engine["onnxruntime"], by_engine["torch"], atol=1e-4)


def test_the_frozen_prefix_runs_on_either_engine(digit_paths):
    model = create_backbone("test_efficientnet", "random", num_classes=10).model
    split = split_trunk(model, 2)
    config = create_backbone("test_efficientnet", "random").data_config
    batch = load_tensor_batch(digit_paths[:5], eval_transform(config))
    onnx_out = OnnxRunner(split.prefix, config.input_size, batch_size=5)(batch)
    torch_out = TorchRunner(split.prefix)(batch)
    assert onnx_out.ndim == 4 and onnx_out.shape == torch_out.shape
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4)


def test_a_runner_accepts_a_last_batch_smaller_than_it_was_warmed_for(digit_paths):
    backbone = create_backbone("test_efficientnet", "random")
    runner = make_runner(backbone.model, backbone.data_config.input_size, 8, "onnxruntime")
    batch = load_tensor_batch(digit_paths[:3], eval_transform(backbone.data_config))
    assert runner(batch).shape == (3, backbone.num_features)


def test_a_batch_over_the_memory_budget_runs_in_slices_with_the_same_outputs(digit_paths, tmp_path):
    backbone = create_backbone("test_efficientnet", "random")
    size = tuple(backbone.data_config.input_size)
    batch = load_tensor_batch(digit_paths[:5], eval_transform(backbone.data_config))
    whole = OnnxRunner(backbone.model, size, batch_size=5)
    assert whole.rows >= 5
    per_image = activation_bytes_per_image(
        export_engine(backbone.model, size, tmp_path / "m.onnx"), size
    )
    two_and_a_half = 2.5 * per_image / 2**20
    sliced = OnnxRunner(backbone.model, size, batch_size=5, run_memory_mb=two_and_a_half)
    sliced.session = _CountingSession(sliced.session)
    np.testing.assert_allclose(sliced(batch), whole(batch), atol=1e-5)
    assert sliced.rows == 2
    assert sliced.session.rows == [2, 2, 1]  # never more than two images' activations at once
    # Slices of equal size: 5 images at 4 a run go as 3 + 2, not 4 + 1.
    four = OnnxRunner(backbone.model, size, batch_size=5, run_memory_mb=4.5 * per_image / 2**20)
    four.session = _CountingSession(four.session)
    np.testing.assert_allclose(four(batch), whole(batch), atol=1e-5)
    assert four.rows == 4
    assert four.session.rows == [3, 2]


def test_the_default_budget_runs_64_lite0_images_at_224_px_a_run(tmp_path):
    """The activations counted are those alive at once (9.7 MB an image), not all of them (62)."""
    backbone = create_backbone("tf_efficientnet_lite0", "random")
    size = tuple(backbone.data_config.input_size)
    path = export_engine(backbone.model, size, tmp_path / "lite0.onnx")
    assert 9e6 < activation_bytes_per_image(path, size) < 11e6
    assert 64 <= rows_for_budget(path, size) < 128  # the features batch (64) runs whole
    assert slice_rows(64, rows_for_budget(path, size, budget_mb=384)) == 32  # 32 + 32
    assert rows_for_budget(path, size, budget_mb=100) == 10


class _CountingSession:
    """An onnxruntime session that records the images of each run."""

    def __init__(self, session) -> None:
        self.session, self.rows = session, []

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, outputs, feed):
        self.rows.extend(len(array) for array in feed.values())
        return self.session.run(outputs, feed)


@pytest.mark.slow
def test_engines_agree_on_the_real_pretrained_backbone(digit_paths):
    backbone = create_backbone("tf_efficientnet_lite0", "packaged")
    torch_features = embed(backbone, digit_paths[:8], "torch")
    onnx_features = embed(backbone, digit_paths[:8], "onnxruntime")
    assert torch_features.shape == (8, 1280)
    np.testing.assert_allclose(onnx_features, torch_features, atol=1e-4)
