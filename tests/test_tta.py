"""Test-time augmentation: the group the invariances generate, the exported graph against
averaging by hand on real images (and its INT8 quantization), and a TTA model through evaluate,
export (INT8 skipped with its reason), `graft predict` and `graft serve`."""

from __future__ import annotations

import json
import subprocess

import httpx
import numpy as np
import pytest
import timm
import torch

from graft.data_config import DataConfig
from graft.export import export_onnx, read_metadata
from graft.features import load_feature_set
from graft.files import read_json
from graft.numeric import softmax
from graft.preprocessing import eval_transform, load_tensor_batch
from graft.quantize import quantize_static_qdq
from graft.runtime import inference_session, run_single
from graft.sample_data import write_sample_data
from graft.stages import evaluate, export, features, finetune, train_head, validate
from graft.stages import evaluate as evaluate_stage
from graft.tta import ELEMENTS, InvariantAverage, group, transform
from tests.conftest import make_project
from tests.fixtures.serving.server import GRAFT, direct_probabilities, running_server


def test_the_declared_invariances_generate_their_group():
    assert group([]) == ["identity"]
    assert group(["hflip"]) == ["identity", "hflip"]
    assert group(["hflip", "vflip"]) == ["identity", "hflip", "vflip", "rot180"]
    assert sorted(group(["rot90"])) == sorted(["identity", "rot90", "rot180", "rot270"])
    assert len(group(["rot90", "hflip"])) == len(group(["hflip", "vflip", "rot90"])) == 8
    assert group(["hflip", "rot90"], square=False) == ["identity", "hflip"]


def test_each_named_transformation_is_that_pixel_permutation():
    x = torch.arange(2 * 3 * 4 * 4.0).reshape(2, 3, 4, 4)
    expected = {
        "identity": x,
        "hflip": x.flip(-1),
        "vflip": x.flip(-2),
        "rot90": torch.rot90(x, 1, (-2, -1)),
        "rot180": torch.rot90(x, 2, (-2, -1)),
        "rot270": torch.rot90(x, 3, (-2, -1)),
        "transpose": x.transpose(-2, -1),
        "antitranspose": torch.rot90(x, 1, (-2, -1)).flip(-1),
    }
    for name, image in expected.items():
        assert torch.equal(transform(x, ELEMENTS[name]), image), name


def test_the_tta_graph_equals_averaging_by_hand_on_real_images(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=10).eval()
    write_sample_data(tmp_path / "digits", per_class=1)
    images = sorted((tmp_path / "digits").rglob("*.png"))
    config = DataConfig.from_dict(timm.data.resolve_data_config({}, model=model))
    batch = load_tensor_batch(images, eval_transform(config))  # real images, not noise
    names = group(["hflip", "vflip", "rot90"])
    by_hand = []  # the eight symmetries of the square, by torch's own rotations and flips
    with torch.no_grad():
        for image in (batch, batch.flip(-1)):
            for quarter_turns in range(4):
                turned = torch.rot90(image, quarter_turns, (-2, -1))
                by_hand.append(model(turned).softmax(dim=1).numpy())
    path = export_onnx(InvariantAverage(model, names), config.input_size, tmp_path / "m.onnx")
    served = softmax(run_single(inference_session(path), batch.numpy()))  # as graft serve does
    np.testing.assert_allclose(served, np.mean(by_hand, axis=0), atol=1e-5)
    assert not np.allclose(served, by_hand[0], atol=1e-3)  # the transformations count
    # INT8 quantization works on such a graph (the export stage skips it for its cost)
    int8 = quantize_static_qdq(path, tmp_path / "int8.onnx", [batch.numpy()])
    quantized = softmax(run_single(inference_session(int8), batch.numpy()))
    assert quantized.shape == served.shape and np.isfinite(quantized).all()


def _keep_tta(monkeypatch) -> None:
    """Make evaluate keep TTA whatever val says (a random tiny model is no test of whether it
    helps), through the real decision code."""
    real = evaluate_stage.choose_by_splits

    def keep(correct, labels, splits, order):
        choice = real(correct, labels, splits, order=order)
        return {**choice, "candidate": "with"} if order == evaluate_stage.TTA_ORDER else choice

    monkeypatch.setattr(evaluate_stage, "choose_by_splits", keep)


@pytest.mark.longest
def test_a_tta_model_is_evaluated_exported_quantized_predicted_and_served(tmp_path, monkeypatch):
    paths = make_project(
        tmp_path / "project",
        overrides={
            "data": {"invariances": ["hflip", "vflip"]},
            "finetune": {"epochs": 1},
        },
    )
    _keep_tta(monkeypatch)
    for stage in (validate, features, train_head, finetune, evaluate, export):
        stage.main(paths.root)
    tta = read_json(paths.metrics / "eval.json")["tta"]
    assert tta["transformations"] == ["identity", "hflip", "vflip", "rot180"]
    assert tta["kept"] and {"val_accuracy_with", "val_accuracy_without"} <= set(tta)
    assert read_json(paths.blessing)["tta"] == tta["transformations"]
    assert read_metadata(paths.onnx_model)["test_time_augmentation"] == tta["transformations"]
    exported = read_json(paths.metrics / "export.json")
    int8 = read_json(paths.int8_dir / "decision.json")
    assert not int8["kept"] and "test-time augmentation" in int8["reason"]  # skipped, and why
    assert exported["int8"] == int8 and not (paths.int8_dir / "model.onnx").exists()
    assert "No INT8 model was made: not tried" in paths.model_card.read_text()
    test_images = len(load_feature_set(paths.features / "test.npz"))
    assert exported["parity"]["images"] == -(-test_images // 4)  # every 4th: the cost without TTA
    assert exported["portable"]["test_images"] == exported["parity"]["images"]

    images = sorted(paths.data.rglob("*.png"))[:3]
    output = tmp_path / "predictions.json"
    result = subprocess.run(
        [*GRAFT, "predict", str(paths.onnx_model), *map(str, images), "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(output.read_text())
    with running_server(paths.onnx_model) as server, httpx.Client(base_url=server.url) as client:
        for image, row in zip(images, rows, strict=True):
            labels, expected = direct_probabilities(paths.onnx_model, image)
            answer = client.post(
                "/predict", content=image.read_bytes(), headers={"content-type": "image/png"}
            ).json()["predictions"][0]
            assert answer["label"] == row["label"] == labels[int(np.argmax(expected))]
            assert answer["probability"] == pytest.approx(float(expected.max()), abs=1e-6)
