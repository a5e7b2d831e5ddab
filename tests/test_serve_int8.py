"""``graft serve`` on the INT8 export: the same answers as onnxruntime run by hand and as
``graft predict``, like the fp32 model in tests/test_serve.py (serve extra only, no torch)."""

from __future__ import annotations

import httpx
import pytest

from tests.fixtures.serving.server import (
    FIXTURES,
    assert_graft_predict_answers_as_served,
    assert_served_as_run_directly,
    running_server,
)

pytestmark = pytest.mark.timeout(300)

INT8_MODEL = FIXTURES / "digits_int8.onnx"  # models/int8/model.onnx of a tiny project


@pytest.fixture(scope="module")
def client():
    with running_server(INT8_MODEL, "--reload-interval", "0") as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            yield http


def test_the_fixture_is_an_int8_model_with_the_export_s_metadata(client):
    meta = client.get("/metadata").json()
    assert meta["labels"] == [str(d) for d in range(10)]
    assert meta["preprocessing"]["input_size"] == [3, 160, 160]
    assert b"QuantizeLinear" in INT8_MODEL.read_bytes()


def test_int8_predictions_equal_onnxruntime_run_directly(client):
    assert_served_as_run_directly(client, INT8_MODEL)


def test_graft_predict_gives_the_int8_server_s_answers(client, tmp_path):
    assert_graft_predict_answers_as_served(client, INT8_MODEL, tmp_path / "predictions.json")
