"""``graft serve`` as an operator meets it: the API contract, metrics, request ids, logs,
connection and upload limits, workers, broken model files, and a fuzz of mutated images.

Most tests run the application in-process (Starlette's test client: no socket, quick); what
lives in uvicorn's protocol (header timeout, connection cap, workers, log lines) runs a real
``graft serve`` process. Needs only the ``serve`` extra.
"""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from graft.serving.app import create_app
from graft.serving.limits import Limits, ServerLimits
from graft.serving.model import ModelError, load_model
from graft.serving.server import ServeSettings, threads_per_worker
from tests.fixtures.serving.server import (
    DIGITS_MODEL,
    FIVE_MODEL,
    GRAFT,
    running_server,
    sample_images,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def client():
    settings = ServeSettings(str(DIGITS_MODEL), Limits(max_body_bytes=200_000, max_batch=4))
    with TestClient(create_app(settings), raise_server_exceptions=False) as http:
        yield http


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def metric(client: TestClient, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when absent)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# ---- The contract /docs is built from ----


def test_openapi_describes_the_predict_bodies_answers_and_errors(client):
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/predict"]["post"]
    content = post["requestBody"]["content"]
    assert content["multipart/form-data"]["schema"]["properties"]["files"]["items"] == {
        "type": "string",
        "format": "binary",
    }
    assert content["image/png"]["schema"]["format"] == "binary"
    assert "application/octet-stream" in content
    ok = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    answer = spec["components"]["schemas"][ok.rsplit("/", 1)[1]]
    assert set(answer["properties"]) == {"model", "predictions"}
    for status in ("400", "408", "413", "415", "422", "500", "503"):
        error = post["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert error.endswith("/ErrorResponse"), status
    assert "/v2/models/{name}/infer" in spec["paths"]
    assert "swagger-ui" in client.get("/docs").text


def test_what_docs_sends_from_the_schema_gets_predictions(client):
    """Swagger UI sends the documented multipart field ``files``, one part per chosen file."""
    images = sample_images()[:2]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in images]
    answer = client.post("/predict", files=files)
    assert answer.status_code == 200, answer.text
    assert [p["filename"] for p in answer.json()["predictions"]] == [p.name for p in images]


def test_no_docs_turns_the_ui_off_and_keeps_the_api():
    settings = ServeSettings(str(DIGITS_MODEL), docs=False)
    with TestClient(create_app(settings)) as http:
        assert http.get("/docs").status_code == 404
        assert http.get("/redoc").status_code == 404
        assert http.get("/readyz").status_code == 200


# ---- Observability ----


def test_metrics_counters_move_with_requests(client):
    image = sample_images()[0].read_bytes()
    ok = metric(client, "graft_requests_total", endpoint="/predict", status="200")
    bad = metric(client, "graft_requests_total", endpoint="/predict", status="400")
    refused = metric(client, "graft_rejections_total", reason="not_an_image")
    images = metric(client, "graft_images_per_request_sum")
    latency = metric(client, "graft_request_duration_seconds_count", endpoint="/predict")
    for _ in range(3):
        client.post("/predict", content=image, headers={"content-type": "image/png"})
    batch = [("files", ("a.png", image, "image/png"))] * 4
    assert client.post("/predict", files=batch).status_code == 200
    client.post("/predict", content=b"not an image", headers={"content-type": "image/png"})
    assert metric(client, "graft_requests_total", endpoint="/predict", status="200") == ok + 4
    assert metric(client, "graft_requests_total", endpoint="/predict", status="400") == bad + 1
    assert metric(client, "graft_rejections_total", reason="not_an_image") == refused + 1
    assert metric(client, "graft_images_per_request_sum") == images + 3 + 4
    assert metric(client, "graft_request_duration_seconds_count", endpoint="/predict") == (
        latency + 5
    )
    sha256 = load_model(DIGITS_MODEL).sha256
    assert metric(client, "graft_model_info", sha256=sha256, version=sha256[:12]) == 1


def test_a_request_id_is_kept_or_made_and_echoed(client):
    image = sample_images()[0].read_bytes()
    mine = client.post("/predict", content=image, headers={"x-request-id": "trace-42"})
    assert mine.headers["x-request-id"] == "trace-42"
    made = client.get("/healthz").headers["x-request-id"]
    other = client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32 and made != other
    forged = client.get("/healthz", headers={"x-request-id": "a b\tc"})  # not kept: unsafe
    assert forged.headers["x-request-id"] != "a b\tc"
    refused = client.post("/predict", content=b"x", headers={"x-request-id": "bad-1"})
    assert refused.status_code == 415 and refused.headers["x-request-id"] == "bad-1"


def test_json_logs_give_one_line_per_request_with_its_id(tmp_path):
    image = sample_images()[0].read_bytes()
    with running_server(DIGITS_MODEL, "--log-format", "json", "--reload-interval", "0") as server:
        httpx.post(
            f"{server.url}/predict",
            content=image,
            headers={"content-type": "image/png", "x-request-id": "json-7"},
        )
        httpx.post(f"{server.url}/predict", content=b"x", headers={"content-type": "image/png"})
        time.sleep(0.2)
        lines = [line for line in server.output().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all("request_id" in entry and "message" in entry for entry in entries)
    (mine,) = [entry for entry in entries if entry["request_id"] == "json-7"]
    version = load_model(DIGITS_MODEL).version
    assert mine["status"] == 200 and mine["images"] == 1 and mine["model_version"] == version
    assert mine["latency_ms"] > 0 and mine["endpoint"] == "/predict"
    refused = [entry for entry in entries if entry.get("status") == 400]
    assert refused and refused[0]["reason"] == "not_an_image"


def test_text_logs_carry_the_request_id():
    with running_server(DIGITS_MODEL, "--reload-interval", "0") as server:
        httpx.get(f"{server.url}/healthz", headers={"x-request-id": "text-9"})
        time.sleep(0.2)
        output = server.output()
    assert any("[text-9]" in line and "/healthz" in line for line in output.splitlines())


# ---- Limits held by uvicorn's protocol and the application ----


def _open(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_slow_headers_get_408_and_the_connection_back():
    with running_server(DIGITS_MODEL, "--header-timeout", "0.5", "--reload-interval", "0") as s:
        slow = _open(s.url)
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        started = time.monotonic()
        answer = _read_all(slow)  # returns when the server closes the socket
        assert time.monotonic() - started < 10
        assert answer.startswith(b"HTTP/1.1 408") and b"header_timeout" in answer
        assert httpx.get(f"{s.url}/readyz").status_code == 200


def test_connections_and_uploads_over_their_caps_get_503_with_retry_after():
    image = sample_images()[0].read_bytes()
    options = ("--max-connections", "3", "--max-concurrent-uploads", "1")
    options += ("--body-timeout", "3", "--header-timeout", "60", "--reload-interval", "0")
    with running_server(DIGITS_MODEL, *options) as server:
        # One upload in progress: headers sent, 10 of 1000 body bytes.
        uploading = _open(server.url)
        uploading.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000\r\n\r\n" + b"0" * 10
        )
        time.sleep(0.5)
        with httpx.Client(base_url=server.url) as http:
            busy = http.post("/predict", content=image, headers={"content-type": "image/png"})
            assert busy.status_code == 503, busy.text
            assert busy.headers["retry-after"] == "1"
            assert busy.json()["detail"]["reason"] == "too_many_uploads"
            # The stalled upload is cut at --body-timeout, and its slot is free again.
            answer = _read_all(uploading)
            assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer
            assert http.post("/predict", content=image, headers={"content-type": "image/png"})
        # Three connections held open; a fourth is answered 503, not left hanging.
        held = [_open(server.url) for _ in range(3)]
        time.sleep(0.3)
        full = httpx.get(f"{server.url}/readyz")
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert full.json()["detail"]["reason"] == "too_many_connections"
        for sock in held:
            sock.close()
        time.sleep(0.3)
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        limits = httpx.get(f"{server.url}/metadata").json()["server_limits"]
        assert limits["max_connections"] == 3 and limits["max_concurrent_uploads"] == 1


def test_two_workers_share_the_port_and_add_up_their_metrics():
    image = sample_images()[0].read_bytes()
    with running_server(DIGITS_MODEL, "--workers", "2", "--reload-interval", "0") as server:
        for _ in range(6):  # new connections: the kernel spreads them over the workers
            answer = httpx.post(
                f"{server.url}/predict", content=image, headers={"content-type": "image/png"}
            )
            assert answer.status_code == 200
        text = httpx.get(f"{server.url}/metrics").text
    samples = {
        (s.name, s.labels.get("endpoint"), s.labels.get("status")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("graft_requests_total", "/predict", "200")] == 6


def test_threads_per_worker_share_the_cores(monkeypatch):
    monkeypatch.setattr("graft.serving.server.cores", lambda: 8)
    assert [threads_per_worker(0, n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    assert threads_per_worker(3, 2) == 3  # given: kept


def test_server_limits_defaults_are_the_cli_defaults():
    import typer.main

    from graft.cli import app

    command = typer.main.get_command(app).commands["serve"]
    defaults = {param.name: param.default for param in command.params}
    limits = ServerLimits()
    assert defaults["max_connections"] == limits.max_connections
    assert defaults["max_concurrent_uploads"] == limits.max_concurrent_uploads
    assert defaults["header_timeout"] == limits.header_timeout_s
    assert defaults["body_timeout"] == limits.body_timeout_s


# ---- Broken model files ----


def malformed_metadata_model(dest: Path) -> Path:
    """DIGITS_MODEL with its preprocessing metadata replaced, byte for byte, by wrong types."""
    data = DIGITS_MODEL.read_bytes()
    start = data.index(b'{"crop_mode"')
    end = data.index(b"}", start) + 1
    bad = b'{"input_size": 3, "interpolation": "bicubic", "mean": 1, "std": 1}'
    dest.write_bytes(data[:start] + bad.ljust(end - start) + data[end:])
    return dest


def test_malformed_metadata_is_a_clear_error_not_a_traceback(tmp_path):
    model = malformed_metadata_model(tmp_path / "model.onnx")
    with pytest.raises(ModelError, match="preprocessing metadata is malformed"):
        load_model(model)
    import subprocess

    result = subprocess.run(
        [*GRAFT, "serve", str(model), "--port", "0"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "preprocessing metadata is malformed" in result.stderr and str(model) in result.stderr
    assert "Traceback" not in result.stderr


def test_a_failed_reload_is_recorded_and_counted(tmp_path):
    production = tmp_path / "model.onnx"
    production.write_bytes(DIGITS_MODEL.read_bytes())
    app = create_app(ServeSettings(str(production), reload_interval_s=0))
    with TestClient(app) as http:
        served = app.state.serving.model
        malformed_metadata_model(tmp_path / "bad.onnx").replace(production)
        assert served.check() is False
        reload = http.get("/metadata").json()["reload"]
        assert reload["failed_reloads"] == 1 and "malformed" in reload["last_error"]
        assert metric(http, "graft_model_reload_failures_total") == 1
        production.write_bytes(FIVE_MODEL.read_bytes())
        assert served.check() is True
        assert metric(http, "graft_model_reloads_total") == 1
        five = load_model(FIVE_MODEL)
        assert metric(http, "graft_model_info", sha256=five.sha256) == 1
        assert metric(http, "graft_model_info", sha256=load_model(DIGITS_MODEL).sha256) == 0


# ---- Fuzz: no malformed image ever gets a 5xx ----

MUTATIONS = 2000


def _seeds() -> list[bytes]:
    base = Image.open(sample_images()[0]).convert("RGB").resize((24, 20))
    seeds = [png(base, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]
    seeds.append(png(base.convert("L")))
    seeds.append(png(base.convert("P")))
    return seeds


def _mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        at = rng.randrange(len(data)) if data else 0
        if kind == 0:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:  # truncate
            del data[rng.randint(0, len(data)) :]
        elif kind == 2:  # insert junk
            data[at:at] = rng.randbytes(rng.randint(1, 64))
        elif kind == 3:  # extreme header values: a size field set to huge or zero
            data[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff"])
        elif kind == 4:  # repeat a chunk
            chunk = data[at : at + rng.randint(1, 200)]
            data[at:at] = chunk * rng.randint(1, 20)
        elif data:  # cut a piece out of the middle
            del data[at : at + rng.randint(1, 64)]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's on corrupt TIFF tags
def test_thousands_of_mutated_images_never_get_a_5xx(client):
    rng = random.Random(20260518)  # seeded: the same images every run
    seeds = _seeds()
    statuses: dict[int, int] = {}
    for index in range(MUTATIONS):
        data = _mutate(rng.choice(seeds), rng)
        if index % 5 == 4:  # some through the Open Inference Protocol, as raw image bytes
            answer = client.post(
                "/v2/models/graft/infer",
                content=_v2_bytes_request(data),
                headers={"inference-header-content-length": str(_v2_header_length(data))},
            )
        else:
            answer = client.post("/predict", content=data, headers={"content-type": "image/png"})
        statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
        assert answer.status_code < 500, (index, answer.status_code, answer.text[:300])
        body = answer.json()
        assert "NaN" not in answer.text
        if answer.status_code >= 400:
            assert body.get("detail", {}).get("reason") or body.get("error"), body
    assert statuses.get(200, 0) > 0 and sum(v for k, v in statuses.items() if k >= 400) > 0


def _v2_header(data: bytes) -> bytes:
    spec = {
        "inputs": [
            {
                "name": "image_bytes",
                "datatype": "BYTES",
                "shape": [1],
                "parameters": {"binary_data_size": len(data) + 4},
            }
        ],
        "outputs": [{"name": "probabilities"}],
    }
    return json.dumps(spec).encode()


def _v2_header_length(data: bytes) -> int:
    return len(_v2_header(data))


def _v2_bytes_request(data: bytes) -> bytes:
    return _v2_header(data) + len(data).to_bytes(4, "little") + data


# ---- The serving image ----


def test_the_serve_lock_pins_the_serve_extra_without_torch_and_docker_caches_it():
    import re

    import tomllib

    root = Path(__file__).resolve().parents[1]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = extra["optional-dependencies"]["serve"] + extra["dependencies"]
    names = {re.split(r"[<>=\[ ;]", spec)[0].lower().replace("_", "-") for spec in wanted}
    lock = (root / "requirements" / "serve.lock").read_text().splitlines()
    pinned = {line.split("==")[0] for line in lock if "==" in line and not line.startswith("#")}
    assert names <= pinned, names - pinned
    assert all("==" in line for line in lock if line.strip() and not line.startswith("#"))
    assert not {"torch", "torchvision", "timm"} & pinned
    serve_stage = (root / "Dockerfile").read_text().split("FROM ")[1]
    lines = serve_stage.splitlines()
    position = {
        key: next(i for i, line in enumerate(lines) if key in line)
        for key in ("requirement requirements/serve.lock", "COPY src", "--no-deps .")
    }
    # the pinned dependencies are installed before the source arrives: a source edit
    # leaves their layer cached
    assert position["requirement requirements/serve.lock"] < position["COPY src"]
    assert position["COPY src"] < position["--no-deps ."]


def _infer_bodies() -> dict[str, tuple[bytes, dict[str, str]]]:
    image = base64.b64encode(sample_images()[0].read_bytes()).decode()

    def body(**changes: object) -> bytes:
        spec = {"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [image]}
        request = {"inputs": [spec]}
        for key, value in changes.items():
            if key == "input_parameters":
                spec["parameters"] = value
            elif key in ("inputs", "outputs", "parameters", "id"):
                request[key] = value
            else:
                spec[key] = value
        return json.dumps(request).encode()

    plain: dict[str, str] = {}
    return {
        "not JSON": (b"{", plain),
        "a list": (b"[]", plain),
        "no inputs": (b"{}", plain),
        "two inputs": (json.dumps({"inputs": [{}, {}]}).encode(), plain),
        "input not an object": (body(inputs=[3]), plain),
        "shape not a list": (body(shape="1"), plain),
        "negative shape": (body(shape=[-1]), plain),
        "bool shape": (body(shape=[True]), plain),
        "unknown datatype": (body(datatype="INT8"), plain),
        "bytes not base64": (body(data=["***"]), plain),
        "bytes not strings": (body(data=[1, 2]), plain),
        "count mismatch": (body(shape=[2]), plain),
        "empty batch": (body(shape=[0], data=[]), plain),
        "fp32 wrong rank": (body(datatype="FP32", shape=[1, 3], data=[0, 0, 0]), plain),
        "fp32 not numbers": (body(datatype="FP32", shape=[1, 1, 1, 1], data=[{"a": 1}]), plain),
        "fp32 NaN": (
            b'{"inputs": [{"datatype": "FP32", "shape": [1,1,1,1], "data": [NaN]}]}',
            plain,
        ),
        "fp32 huge": (body(datatype="FP32", shape=[1, 1, 1, 1], data=[1e30]), plain),
        "fp32 wrong size": (body(datatype="FP32", shape=[1, 3, 8, 8], data=[0.0] * 192), plain),
        "outputs not a list": (body(outputs="probabilities"), plain),
        "unknown output": (body(outputs=[{"name": "logits"}]), plain),
        "output parameters not an object": (
            body(outputs=[{"name": "label", "parameters": "x"}]),
            plain,
        ),
        "bad header length": (body(), {"inference-header-content-length": "999999"}),
        "header length not a number": (body(), {"inference-header-content-length": "-3"}),
        "binary size mismatch": (
            body(data=None, input_parameters={"binary_data_size": 9}) + b"\x01\x00\x00\x00x",
            {
                "inference-header-content-length": str(
                    len(body(data=None, input_parameters={"binary_data_size": 9}))
                )
            },
        ),
    }


@pytest.mark.parametrize("case", list(_infer_bodies()))
def test_each_malformed_infer_request_gets_a_4xx_in_the_protocol_s_shape(client, case):
    content, headers = _infer_bodies()[case]
    answer = client.post("/v2/models/graft/infer", content=content, headers=headers)
    assert 400 <= answer.status_code < 500, (case, answer.status_code, answer.text)
    assert set(answer.json()) == {"error"} and answer.json()["error"]
