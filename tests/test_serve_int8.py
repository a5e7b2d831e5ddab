"""``graft serve`` on the INT8 export: the same answers as onnxruntime run by hand and as
``graft predict``, like the fp32 model in tests/test_serve.py (serve extra only, no torch)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.fixtures.serving.server import (
    FIXTURES,
    GRAFT,
    IMAGES,
    direct_probabilities,
    running_server,
    sample_images,
)

pytestmark = pytest.mark.timeout(300)

INT8_MODEL = FIXTURES / "digits_int8.onnx"  # models/int8/model.onnx of a tiny project


@pytest.fixture(scope="module")
def client():
    with running_server(INT8_MODEL, "--reload-interval", "0") as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            yield http


def predict(client: httpx.Client, image: Path) -> dict:
    response = client.post(
        "/predict",
        params={"top_k": 10},
        content=image.read_bytes(),
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]


def test_the_fixture_is_an_int8_model_with_the_export_s_metadata(client):
    meta = client.get("/metadata").json()
    assert meta["labels"] == [str(d) for d in range(10)]
    assert meta["preprocessing"]["input_size"] == [3, 160, 160]
    assert b"QuantizeLinear" in INT8_MODEL.read_bytes()


def test_int8_predictions_equal_onnxruntime_run_directly(client):
    for image in sample_images():
        answer = predict(client, image)
        labels, expected = direct_probabilities(INT8_MODEL, image)
        served = {entry["label"]: entry["probability"] for entry in answer["top_k"]}
        np.testing.assert_allclose([served[label] for label in labels], expected, atol=1e-6)
        assert answer["label"] == labels[int(np.argmax(expected))]


def test_graft_predict_gives_the_int8_server_s_answers(client, tmp_path):
    output = tmp_path / "predictions.json"
    result = subprocess.run(
        [*GRAFT, "predict", str(INT8_MODEL), str(IMAGES), "-o", str(output), "--top-k", "10"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(output.read_text())
    assert [row["path"] for row in rows] == [str(image) for image in sample_images()]
    for row in rows:
        served = predict(client, Path(row["path"]))
        assert row["top_k"] == served["top_k"]  # the same floats, not merely close ones
