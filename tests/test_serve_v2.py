"""The Open Inference Protocol (KServe v2) through a real client: Triton's ``tritonclient``.

A real ``graft serve`` process; the client speaks the protocol as it does to Triton or KServe
(its default binary tensor extension, and plain JSON). Its probabilities must equal
``/predict``'s.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from graft.data.images import load_image
from graft.serving.model import load_model
from tests.fixtures.serving.server import DIGITS_MODEL, running_server, sample_images

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server():
    with running_server(DIGITS_MODEL, "--reload-interval", "0") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.url.removeprefix("http://")) as oip:
        yield oip


def predict_probabilities(url: str, image: bytes) -> np.ndarray:
    """``/predict``'s probabilities in the order of the model's labels."""
    labels = httpx.get(f"{url}/metadata").json()["labels"]
    answer = httpx.post(
        f"{url}/predict",
        content=image,
        params={"top_k": len(labels)},
        headers={"content-type": "image/png"},
    ).json()
    found = {entry["label"]: entry["probability"] for entry in answer["predictions"][0]["top_k"]}
    return np.array([found[label] for label in labels])


def test_health_and_model_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("graft")
    assert not client.is_model_ready("another")
    model = load_model(DIGITS_MODEL)
    metadata = client.get_model_metadata("graft")
    assert metadata["versions"] == [model.version]
    assert metadata["inputs"][0] == {
        "name": "image",
        "datatype": "FP32",
        "shape": [-1, 3, 160, 160],
    }
    assert metadata["outputs"][0]["shape"] == [-1, 10]
    assert client.get_model_metadata("graft", model_version=model.version)["name"] == "graft"


def test_raw_images_as_a_bytes_tensor_equal_predict(client, server):
    images = [path.read_bytes() for path in sample_images()[:5]]
    tensor = triton.InferInput("image_bytes", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))  # binary extension
    result = client.infer("graft", [tensor], request_id="batch-1")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (5, 10) and result.get_response()["id"] == "batch-1"
    labels = result.as_numpy("label")
    for row, image, label in zip(probabilities, images, labels, strict=True):
        expected = predict_probabilities(server.url, image)
        np.testing.assert_allclose(row, expected, atol=1e-6)
        assert label.decode() == str(int(np.argmax(expected)))


def test_a_preprocessed_fp32_tensor_in_json_equals_predict(client, server):
    model = load_model(DIGITS_MODEL)
    paths = sample_images()[5:8]
    batch = np.stack([model.preprocess(load_image(path)) for path in paths])
    tensor = triton.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=False)  # plain JSON numbers
    wanted = [triton.InferRequestedOutput("probabilities", binary_data=False)]
    result = client.infer("graft", [tensor], outputs=wanted)
    assert result.get_output("probabilities")["data"]  # answered as JSON
    for row, path in zip(result.as_numpy("probabilities"), paths, strict=True):
        np.testing.assert_allclose(
            row, predict_probabilities(server.url, path.read_bytes()), atol=1e-6
        )


def test_errors_come_back_in_the_protocol_s_shape(client, server):
    tensor = triton.InferInput("image_bytes", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="not_an_image"):
        client.infer("graft", [tensor])
    with pytest.raises(InferenceServerException, match="Unknown model 'nope'"):
        client.infer("nope", [tensor])
    wrong = triton.InferInput("image", [1, 3, 8, 8], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InferenceServerException, match="this model takes"):
        client.infer("graft", [wrong])
    raw = httpx.post(f"{server.url}/v2/models/graft/infer", content=b"{not json")
    assert raw.status_code == 400 and set(raw.json()) == {"error"}
