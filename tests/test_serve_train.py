"""Serving checked against the training side (needs the ``train`` extra: torch, timm, onnx).

- The server's Pillow/NumPy preprocessing equals timm's eval transform, so they cannot drift.
- The committed fixture models still carry what the exporter writes today.
- ``graft serve`` and ``graft predict`` on a model exported right here agree with torch.
"""

from __future__ import annotations

import json
import subprocess

import httpx
import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from PIL import Image  # noqa: E402

from graft.classifier import build_classifier, load_checkpoint  # noqa: E402
from graft.data_config import DataConfig  # noqa: E402
from graft.export import read_metadata  # noqa: E402
from graft.files import read_json  # noqa: E402
from graft.preprocessing import eval_transform  # noqa: E402
from graft.sample_data import digit_images  # noqa: E402
from graft.serving.model import Preprocessing  # noqa: E402
from graft.stages import evaluate, export, features, finetune, train_head, validate  # noqa: E402
from tests.conftest import make_project  # noqa: E402
from tests.fixtures.serving.server import (  # noqa: E402
    DIGITS_MODEL,
    FIVE_MODEL,
    GRAFT,
    NAN_MODEL,
    running_server,
)

pytestmark = pytest.mark.timeout(600)

REGENERATE = "run `python tests/fixtures/serving/make_fixtures.py` and commit the fixtures"


def real_images() -> list[Image.Image]:
    """Real photos and scans of several shapes, plus odd sizes an upload can have."""
    import io

    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(array) for array in load_sample_images().images]  # 640x427
    digits = [Image.open(io.BytesIO(png)).convert("RGB") for _, _, png in digit_images(2)]
    china = photos[0]
    # The last crop is 18.5:1, near the loader's bound (graft.data.images.MAX_ASPECT_RATIO).
    crops = [china.crop((0, 0, 100, 300)), china.crop((5, 5, 406, 406)), china.crop((0, 0, 2, 37))]
    return photos + digits[:6] + crops + [china.resize((161, 160)), china.rotate(90, expand=True)]


CONFIGS = {
    "tf_efficientnet_lite0": dict(
        input_size=[3, 224, 224],
        interpolation="bicubic",
        crop_pct=0.875,
        crop_mode="center",
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
    ),
    "imagenet bilinear, no crop": dict(
        input_size=[3, 224, 224],
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="center",
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
    ),
    "non-square input": dict(
        input_size=[3, 192, 256],
        interpolation="bicubic",
        crop_pct=0.9,
        crop_mode="center",
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
    ),
    "squash, lanczos": dict(
        input_size=[3, 160, 160],
        interpolation="lanczos",
        crop_pct=0.95,
        crop_mode="squash",
        mean=[0.4, 0.5, 0.6],
        std=[0.2, 0.25, 0.3],
    ),
    "no crop_mode, nearest": dict(
        input_size=[3, 100, 100],
        interpolation="nearest",
        crop_pct=0.8,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_serving_preprocessing_equals_timm_eval_transform(name):
    config = CONFIGS[name]
    ours = Preprocessing.from_config(config)
    timms = eval_transform(DataConfig.from_dict(config))
    for image in real_images():
        expected = timms(image).numpy()
        got = ours(image)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.abs(got - expected).max() <= 1e-6, (name, image.size)


def test_serving_preprocessing_equals_timm_for_timm_s_own_data_configs():
    for model_name in (
        "test_efficientnet",
        "tf_efficientnet_lite0",
        "resnet18",
        "vit_tiny_patch16_224",
    ):
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
        config = timm.data.resolve_model_data_config(model)
        ours = Preprocessing.from_config(config)
        timms = eval_transform(DataConfig.from_dict(config))
        for image in real_images()[:4]:
            assert np.abs(ours(image) - timms(image).numpy()).max() <= 1e-6, model_name


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny project run through every stage to ``models/model.onnx``, as users export."""
    project = tmp_path_factory.mktemp("served") / "project"
    paths = make_project(project, overrides={"finetune": {"enabled": False}})  # head-only: quicker
    for stage in (validate, features, train_head, finetune, evaluate, export):
        stage.main(paths.root)
    return paths


def _signature(path) -> tuple:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    return inp.name, inp.shape, inp.type, out.name, out.shape[0], out.type


def test_the_fixture_models_carry_what_the_exporter_writes_today(exported):
    today = read_metadata(exported.onnx_model)
    for fixture in (DIGITS_MODEL, FIVE_MODEL, NAN_MODEL):
        metadata = read_metadata(fixture)
        assert sorted(metadata) == sorted(today), (
            f"{fixture.name}: metadata keys changed; {REGENERATE}"
        )
        assert metadata["preprocessing"] == today["preprocessing"], f"{fixture.name}: {REGENERATE}"
        for key, value in today.items():
            assert type(metadata[key]) is type(value), f"{fixture.name}: {key}; {REGENERATE}"
    assert read_metadata(DIGITS_MODEL)["labels"] == today["labels"]
    assert _signature(DIGITS_MODEL) == _signature(exported.onnx_model), REGENERATE
    assert _signature(FIVE_MODEL) == _signature(exported.onnx_model), REGENERATE


def _torch_probabilities(paths, images) -> np.ndarray:
    blessing = read_json(paths.blessing)
    checkpoint = load_checkpoint(paths.root / blessing["model"])
    model = build_classifier(checkpoint)
    transform = eval_transform(checkpoint.spec.data_config)
    from graft.data.images import load_image

    batch = torch.stack([transform(load_image(image)) for image in images])
    with torch.inference_mode():
        return torch.softmax(model(batch), dim=1).numpy()


def test_graft_serve_and_graft_predict_on_an_exported_model_agree_with_torch(exported, tmp_path):
    images = sorted(exported.data.rglob("*.png"))[::7]
    labels = read_metadata(exported.onnx_model)["labels"]
    expected = _torch_probabilities(exported, images)
    output = tmp_path / "predictions.json"
    result = subprocess.run(
        [*GRAFT, "predict", str(exported.onnx_model), *map(str, images), "-o", str(output)]
        + ["--top-k", "10"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(output.read_text())
    with running_server(exported.onnx_model) as server:
        for image, row, torch_row in zip(images, rows, expected, strict=True):
            response = httpx.post(
                f"{server.url}/predict",
                params={"top_k": 10},
                content=image.read_bytes(),
                headers={"content-type": "image/png"},
            )
            assert response.status_code == 200, response.text
            answer = response.json()["predictions"][0]
            assert answer["top_k"] == row["top_k"]  # server and batch CLI: the same floats
            served = {entry["label"]: entry["probability"] for entry in answer["top_k"]}
            np.testing.assert_allclose([served[label] for label in labels], torch_row, atol=1e-4)
            assert answer["label"] == labels[int(torch_row.argmax())]
