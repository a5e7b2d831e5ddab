"""``graft serve`` as a client meets it: a real server process over HTTP on 127.0.0.1.

These tests need only the ``serve`` extra (they use the committed fixture models, see
tests/fixtures/serving/make_fixtures.py): ``make test-serve`` runs them in a fresh venv without
torch, which proves the server needs none.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from graft.serving.limits import Limits
from tests.fixtures.serving.server import (
    DIGITS_MODEL,
    FIVE_MODEL,
    GRAFT,
    NAN_MODEL,
    assert_graft_predict_answers_as_served,
    assert_served_as_run_directly,
    running_server,
    sample_images,
)

pytestmark = pytest.mark.timeout(300)

LIMITS = ("--max-body-bytes", "200000", "--max-pixels", "1000000", "--max-batch", "4")
HEAVY_MODULES = ("torch", "timm", "onnx", "sklearn", "pandas")


@pytest.fixture(scope="module")
def server():
    with running_server(DIGITS_MODEL, *LIMITS, "--reload-interval", "0") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def predict_raw(client: httpx.Client, data: bytes, top_k: int = 10, **headers: str):
    headers = {"content-type": "image/png", **headers}
    return client.post("/predict", params={"top_k": top_k}, content=data, headers=headers)


def test_health_readiness_and_metadata_describe_the_served_file(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    sha256 = hashlib.sha256(DIGITS_MODEL.read_bytes()).hexdigest()
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model": {"sha256": sha256, "version": sha256[:12]}}
    meta = client.get("/metadata").json()
    assert meta["labels"] == [str(d) for d in range(10)]
    assert (
        meta["model"]["sha256"] == sha256 and meta["model"]["bytes"] == DIGITS_MODEL.stat().st_size
    )
    assert meta["preprocessing"]["input_size"] == [3, 160, 160]
    assert meta["metadata"]["backbone"] == "test_efficientnet"  # the export's own metadata
    assert meta["limits"] == {
        "max_body_bytes": 200000,
        "max_pixels": 1000000,
        "max_batch": 4,
        "default_top_k": 5,
    }
    assert meta["reload"] == {
        "interval_s": 0.0,
        "reloads": 0,
        "failed_reloads": 0,
        "last_error": None,
    }


def test_predictions_on_real_digits_equal_onnxruntime_run_directly(client):
    assert_served_as_run_directly(client, DIGITS_MODEL)


def test_a_multipart_batch_answers_each_image_in_order_as_alone(client):
    images = sample_images()[:4]
    files = [("files", (image.name, image.read_bytes(), "image/png")) for image in images]
    batch = client.post("/predict", files=files, params={"top_k": 3})
    assert batch.status_code == 200, batch.text
    answers = batch.json()["predictions"]
    assert [answer["filename"] for answer in answers] == [image.name for image in images]
    for image, answer in zip(images, answers, strict=True):
        alone = predict_raw(client, image.read_bytes(), top_k=3).json()["predictions"][0]
        assert answer["label"] == alone["label"] and len(answer["top_k"]) == 3
        np.testing.assert_allclose(
            [e["probability"] for e in answer["top_k"]],
            [e["probability"] for e in alone["top_k"]],
            atol=1e-6,
        )
    single = client.post("/predict", files={"file": ("one.png", images[0].read_bytes())})
    assert single.status_code == 200 and len(single.json()["predictions"]) == 1
    assert len(single.json()["predictions"][0]["top_k"]) == 5  # --top-k's default


def test_graft_predict_gives_the_server_s_answers(client, tmp_path):
    assert_graft_predict_answers_as_served(client, DIGITS_MODEL, tmp_path / "predictions.json")


def test_top_k_is_capped_at_the_number_of_labels(client):
    response = predict_raw(client, sample_images()[0].read_bytes(), top_k=1000)
    assert response.status_code == 200
    top_k = response.json()["predictions"][0]["top_k"]
    assert len(top_k) == 10 and math.isclose(sum(e["probability"] for e in top_k), 1.0)


def _multipart(boundary: str, *parts: bytes) -> bytes:
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def _bad_requests() -> dict[str, tuple[dict, int, str]]:
    digit = sample_images()[0].read_bytes()
    big_png = png_bytes(Image.new("L", (1001, 1000), 255))  # 1,001,000 pixels, a small file
    assert len(big_png) < 200000
    ppm = io.BytesIO()
    Image.new("RGB", (8, 8)).save(ppm, format="PPM")
    png = {"content-type": "image/png"}
    files = [("files", (f"{i}.png", digit, "image/png")) for i in range(5)]

    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    return {
        "text instead of an image": (
            dict(content=b"hello, world", headers=png),
            400,
            "not_an_image",
        ),
        "truncated png": (dict(content=digit[: len(digit) // 2], headers=png), 400, "truncated"),
        "empty body": (dict(content=b"", headers=png), 400, "empty"),
        "a picture in a format graft refuses": (
            dict(content=ppm.getvalue(), headers=png),
            400,
            "unsupported_format",
        ),
        "multipart without files": (
            dict(
                content=_multipart("xyz"),
                headers={"content-type": "multipart/form-data; boundary=xyz"},
            ),
            400,
            "empty_batch",
        ),
        "a bad image inside a batch": (
            dict(files=[("files", ("ok.png", digit)), ("files", ("bad.png", b"no image"))]),
            400,
            "not_an_image",
        ),
        "body over --max-body-bytes": (
            dict(content=b"\0" * 300_000, headers=png),
            413,
            "body_too_large",
        ),
        "chunked body over --max-body-bytes": (
            dict(content=chunks(), headers=png),
            413,
            "body_too_large",
        ),
        "image over --max-pixels": (dict(content=big_png, headers=png), 413, "too_many_pixels"),
        "batch over --max-batch": (dict(files=files), 413, "batch_too_large"),
        "json body": (
            dict(content=b'{"image": "..."}', headers={"content-type": "application/json"}),
            415,
            "unsupported_media_type",
        ),
        "text/plain body": (
            dict(content=digit, headers={"content-type": "text/plain"}),
            415,
            "unsupported_media_type",
        ),
        "no content type": (dict(content=digit), 415, "unsupported_media_type"),
        "multipart without boundary": (
            dict(content=b"abc", headers={"content-type": "multipart/form-data"}),
            422,
            "malformed_multipart",
        ),
        "garbled multipart": (
            dict(
                content=b"garbage\r\n--xyz\r\nContent-Disposition: form-data\r\n\r\nabc",
                headers={"content-type": "multipart/form-data; boundary=xyz"},
            ),
            422,
            "malformed_multipart",
        ),
        "a text field instead of a file": (
            dict(data={"file": "digit.png"}, files={"x": ("x.png", digit)}),
            422,
            "not_a_file",
        ),
        "top_k=0": (
            dict(content=digit, headers=png, params={"top_k": 0}),
            422,
            "invalid_parameter",
        ),
        "top_k=abc": (
            dict(content=digit, headers=png, params={"top_k": "abc"}),
            422,
            "invalid_parameter",
        ),
    }


BAD_REQUESTS = _bad_requests()


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_each_bad_request_gets_its_4xx_with_a_json_reason(client, case):
    kwargs, status, reason = BAD_REQUESTS[case]
    response = client.post("/predict", **kwargs)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail["reason"] == reason and len(detail["message"]) > 10
    assert client.get("/readyz").status_code == 200  # and the server is fine


def test_a_body_over_the_limit_is_refused_before_it_is_read(client):
    # 20 MB declared against a 200 kB limit: the 413 comes from the header, and the same
    # connection serves the next request.
    response = client.post(
        "/predict", content=b"\0" * 20_000_000, headers={"content-type": "image/png"}
    )
    assert response.status_code == 413 and "200000" in response.json()["detail"]["message"]
    assert predict_raw(client, sample_images()[0].read_bytes()).status_code == 200


def _odd_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    sixteen_bit = Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16))
    transparent = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    return {
        "black": png_bytes(Image.new("RGB", (64, 64), 0)),
        "white": png_bytes(Image.new("RGB", (64, 64), (255, 255, 255))),
        "one pixel": png_bytes(Image.new("L", (1, 1), 7)),
        "a thin strip": png_bytes(Image.new("RGB", (400, 20), (3, 200, 90))),  # 20:1, the bound
        "noise": png_bytes(Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))),
        "16-bit grey": png_bytes(sixteen_bit),
        "transparent": png_bytes(transparent),
        "palette": png_bytes(Image.new("P", (17, 9), 3)),
    }


def test_odd_but_valid_images_get_finite_probabilities_never_a_5xx(client):
    for name, data in _odd_images().items():
        response = predict_raw(client, data)
        assert response.status_code == 200, (name, response.text)
        assert "NaN" not in response.text and "Infinity" not in response.text
        top_k = response.json()["predictions"][0]["top_k"]
        probabilities = [entry["probability"] for entry in top_k]
        assert all(math.isfinite(p) and 0 <= p <= 1 for p in probabilities), name
        assert math.isclose(sum(probabilities), 1.0, rel_tol=1e-9), name


def test_a_model_that_outputs_nan_gets_a_json_500_never_a_nan():
    with running_server(NAN_MODEL, "--reload-interval", "0") as nan_server:
        response = httpx.post(
            f"{nan_server.url}/predict",
            content=sample_images()[0].read_bytes(),
            headers={"content-type": "image/png"},
        )
        assert response.status_code == 500
        assert response.json()["detail"]["reason"] == "non_finite_output"
        assert "NaN" not in response.text
        assert "roll back" in response.json()["detail"]["message"]
        # bad input is still the client's fault, even with a broken model
        refused = httpx.post(
            f"{nan_server.url}/predict", content=b"x", headers={"content-type": "image/png"}
        )
        assert refused.status_code == 400


def _replace_atomically(source: Path, dest: Path) -> None:
    """What promotion does: a complete copy beside ``dest``, then a rename over it."""
    temporary = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, dest)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hammer(url: str, image: bytes, stop: threading.Event, answers: list, failures: list) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = predict_raw(http, image)
                answers.append((started, response.status_code, response.json()))
            except Exception as exc:  # a dropped connection is a failure of the test
                failures.append(repr(exc))


def _wait_for_model(url: str, sha256: str, timeout_s: float = 60) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/metadata").json()["model"]["sha256"] == sha256:
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"the server did not switch to {sha256[:12]} in {timeout_s} s")


def test_replacing_the_model_file_under_load_switches_models_and_loses_no_request(tmp_path):
    production = tmp_path / "production" / "model.onnx"
    production.parent.mkdir()
    shutil.copyfile(DIGITS_MODEL, production)
    digits_sha, five_sha = _sha256(DIGITS_MODEL), _sha256(FIVE_MODEL)
    image = sample_images()[3].read_bytes()
    answers: list = []
    failures: list = []
    stop = threading.Event()
    with running_server(production, "--reload-interval", "0.1") as running:
        clients = [
            threading.Thread(target=_hammer, args=(running.url, image, stop, answers, failures))
            for _ in range(4)
        ]
        for thread in clients:
            thread.start()
        try:
            while len(answers) + len(failures) < 40:
                time.sleep(0.01)
            _replace_atomically(FIVE_MODEL, production)  # promotion
            switched = _wait_for_model(running.url, five_sha)
            settled = len(answers) + len(failures)
            while len(answers) + len(failures) < settled + 40:
                time.sleep(0.01)
            rollback_started = time.monotonic()
            _replace_atomically(DIGITS_MODEL, production)  # rollback
            rolled_back = _wait_for_model(running.url, digits_sha)
            settled = len(answers) + len(failures)
            while len(answers) + len(failures) < settled + 40:
                time.sleep(0.01)
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=60)
        metadata = httpx.get(f"{running.url}/metadata").json()
    assert failures == []
    assert [status for _, status, _ in answers] == [200] * len(answers)
    labels_of = {digits_sha: {str(d) for d in range(10)}, five_sha: {str(d) for d in range(5)}}
    for _, _, body in answers:  # every answer is wholly one model's: its hash and its labels
        sha = body["model"]["sha256"]
        assert {entry["label"] for entry in body["predictions"][0]["top_k"]} == labels_of[sha]
    by_time = sorted(answers, key=lambda answer: answer[0])
    after_switch = [b["model"]["sha256"] for t, _, b in by_time if switched < t < rollback_started]
    after_rollback = [b["model"]["sha256"] for t, _, b in by_time if t > rolled_back]
    assert after_switch and set(after_switch) == {five_sha}
    assert after_rollback and set(after_rollback) == {digits_sha}
    assert metadata["reload"]["reloads"] == 2 and metadata["reload"]["last_error"] is None


def test_a_broken_replacement_is_refused_and_the_old_model_keeps_serving(tmp_path):
    production = tmp_path / "model.onnx"
    shutil.copyfile(DIGITS_MODEL, production)
    with running_server(production, "--reload-interval", "0.1") as running:
        broken = tmp_path / "broken.onnx"
        broken.write_bytes(b"not a model at all")
        _replace_atomically(broken, production)
        deadline = time.monotonic() + 30
        while httpx.get(f"{running.url}/metadata").json()["reload"]["last_error"] is None:
            assert time.monotonic() < deadline, "the broken file was never noticed"
            time.sleep(0.05)
        metadata = httpx.get(f"{running.url}/metadata").json()
        assert "not a usable ONNX model" in metadata["reload"]["last_error"]
        assert metadata["model"]["sha256"] == _sha256(DIGITS_MODEL)
        response = httpx.post(
            f"{running.url}/predict",
            content=sample_images()[0].read_bytes(),
            headers={"content-type": "image/png"},
        )
        assert response.status_code == 200
        _replace_atomically(FIVE_MODEL, production)  # a good file after a bad one is taken
        _wait_for_model(running.url, _sha256(FIVE_MODEL))
        assert "reload refused" in running.output() and "reloaded" in running.output()


def test_a_model_that_cannot_be_served_stops_graft_serve_with_a_clear_error(tmp_path):
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("hello")
    for model, message in ((tmp_path / "missing.onnx", "not found"), (not_onnx, "not a usable")):
        result = subprocess.run(
            [*GRAFT, "serve", str(model), "--port", "0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 4  # ExitCode.BAD_INPUT: the model file given
        assert message in result.stderr and str(model) in result.stderr
        assert "Traceback" not in result.stderr


def test_serving_imports_no_training_library():
    code = (
        "import sys, graft.cli, graft.serving.app, graft.serving.predict, graft.data.images; "
        f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_graft_help_lists_serve_and_predict():
    result = subprocess.run([*GRAFT, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout and "predict" in result.stdout


@pytest.mark.skipif(
    os.environ.get("GRAFT_SERVE_ONLY_VENV") != "1",
    reason="only in make test-serve's venv, which has the serve extra alone",
)
def test_the_serve_only_venv_has_no_torch():
    for module in HEAVY_MODULES:
        with pytest.raises(ImportError):
            __import__(module)


def test_the_cli_defaults_are_the_server_limits():
    import typer.main

    from graft.cli import app

    command = typer.main.get_command(app)
    defaults = {param.name: param.default for param in command.commands["serve"].params}
    limits = Limits()
    assert defaults["max_body_bytes"] == limits.max_body_bytes
    assert defaults["max_pixels"] == limits.max_pixels
    assert defaults["max_batch"] == limits.max_batch
    assert defaults["top_k"] == limits.default_top_k
    assert (defaults["host"], defaults["port"]) == ("127.0.0.1", 8000)
