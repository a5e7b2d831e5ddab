"""The Open Inference Protocol (KServe v2, REST) beside graft's own API.

What KServe, Triton's clients, Seldon MLServer and most inference gateways speak:

``GET /v2``                                  server metadata
``GET /v2/health/live``, ``/v2/health/ready``  ``{"live": true}``, ``{"ready": true}``
``GET /v2/models/{name}[/versions/{v}]``      model metadata (inputs, outputs)
``GET /v2/models/{name}[/versions/{v}]/ready``
``POST /v2/models/{name}[/versions/{v}]/infer``

The model's name is ``--model-name`` (``graft`` by default); its version is the served file's
(the first 12 hex digits of its sha256). ``infer`` takes exactly one input tensor:

- ``image`` (any name), ``FP32``, shape ``[N, 3, H, W]``: images already preprocessed as the
  model's metadata says (``GET /metadata``'s ``preprocessing``);
- ``image_bytes`` (any name), ``BYTES``, shape ``[N]`` or ``[N, 1]``: encoded image files
  (PNG, JPEG, ...), decoded and preprocessed by the server exactly as ``/predict`` does.

It answers ``probabilities`` (``FP64``, ``[N, classes]``, softmax, in the order of the
model's labels) and ``label`` (``BYTES``, ``[N]``, the most probable label). Tensor data may be
JSON (``data``; ``BYTES`` elements base64-encoded) or the binary tensor extension Triton's
clients use (``Inference-Header-Content-Length``, ``binary_data_size``,
``binary_data_output``). Errors are ``{"error": "<message>"}`` with a 4xx status.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from graft import __version__
from graft.serving.inputs import RequestRejected, check_batch, preprocess_images
from graft.serving.model import ServedModel, softmax

HEADER_LENGTH = "inference-header-content-length"
OUTPUTS = ("probabilities", "label")
# A normalised image lies within about +-3; far larger inputs overflow the logits.
MAX_FP32_VALUE = 1e4


def v2_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the protocol's shape."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def v2_router(app_state: Any) -> APIRouter:
    """The protocol's routes over ``app_state`` (graft's :class:`ServingState`)."""
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])

    @router.get("", summary="Server metadata")
    def server_metadata() -> dict[str, Any]:
        return {"name": "graft", "version": __version__, "extensions": ["binary_tensor_data"]}

    @router.get("/health/live", summary="Liveness")
    def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready", summary="Readiness: a model is loaded and warm")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    def model_for(name: str, version: str | None) -> ServedModel:
        model = app_state.model.current
        if name != app_state.model_name:
            raise RequestRejected(
                404,
                "unknown_model",
                f"Unknown model '{name}': this server serves '{app_state.model_name}'.",
            )
        if version not in (None, model.version):
            raise RequestRejected(
                404,
                "unknown_version",
                f"Model '{name}' version '{version}' is not served; "
                f"the version served is '{model.version}'.",
            )
        return model

    def metadata(name: str, version: str | None = None) -> dict[str, Any]:
        model = model_for(name, version)
        channels, height, width = model.preprocessing.input_size
        return {
            "name": name,
            "versions": [model.version],
            "platform": "onnxruntime_onnx",
            "inputs": [
                {"name": "image", "datatype": "FP32", "shape": [-1, channels, height, width]},
                {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
            ],
            "outputs": [
                {"name": "probabilities", "datatype": "FP64", "shape": [-1, len(model.labels)]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
            ],
            "parameters": {"labels": list(model.labels), "sha256": model.sha256},
        }

    def model_ready(name: str, version: str | None = None) -> dict[str, Any]:
        return {"name": name, "ready": model_for(name, version) is not None}

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        model = model_for(name, version)
        request.state.model_version = model.version
        async with app_state.uploads.take():
            body = await app_state.read_body(request)
            call = parse_infer_request(body, request.headers.get(HEADER_LENGTH))
            request.state.images = call.count
            check_batch(call.count, app_state.limits.max_batch)
            probabilities = await run_in_threadpool(
                _probabilities, model, call, app_state.limits.max_pixels
            )
        return infer_response(call, model, name, probabilities)

    for prefix in ("/models/{name}", "/models/{name}/versions/{version}"):
        router.add_api_route(prefix, metadata, methods=["GET"], summary="Model metadata")
        router.add_api_route(prefix + "/ready", model_ready, methods=["GET"], summary="Ready")
        router.add_api_route(
            prefix + "/infer",
            infer,
            methods=["POST"],
            summary="Classify a batch (FP32 tensor or BYTES encoded images)",
            openapi_extra=INFER_OPENAPI,
        )
    return router


INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
                                    "data": {"type": "array", "items": {}},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "Binary tensor extension: the JSON header "
                "(Inference-Header-Content-Length bytes) followed by the tensors' bytes.",
            },
        },
    },
    "responses": {
        "400": {"description": 'A malformed request: {"error": "..."}'},
        "404": {"description": 'An unknown model or version: {"error": "..."}'},
    },
}


class InferCall:
    """A parsed ``infer`` request: one input, the outputs wanted and how to send them."""

    def __init__(
        self,
        request_id: str | None,
        tensor: np.ndarray | None,
        images: list[bytes] | None,
        outputs: list[tuple[str, bool]],
    ) -> None:
        self.request_id, self.tensor, self.images, self.outputs = (
            request_id,
            tensor,
            images,
            outputs,
        )

    @property
    def count(self) -> int:
        return len(self.images) if self.images is not None else len(self.tensor)


def _bad(message: str) -> RequestRejected:
    return RequestRejected(400, "invalid_inference_request", message)


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_infer_request(body: bytes, header_length: str | None) -> InferCall:
    """Read an ``infer`` body: the JSON part and, with the binary extension, the tensor bytes.

    Raises:
        RequestRejected: 400 naming what is malformed.
    """
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _bad(
                f"Inference-Header-Content-Length '{header_length}' is not a length within "
                f"the {len(body)}-byte body."
            )
        head, binary = body[: int(header_length)], body[int(header_length) :]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"The request is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise _bad("The request must be a JSON object with an 'inputs' list.")
    if len(request["inputs"]) == 1 and not isinstance(request["inputs"][0], dict):
        raise _bad("The input must be a JSON object: name, datatype, shape and data.")
    if len(request["inputs"]) != 1:
        raise _bad(
            f"{len(request['inputs'])} inputs given; send exactly one: 'image' (FP32 "
            "[N, 3, H, W]) or 'image_bytes' (BYTES [N], encoded image files)."
        )
    spec = request["inputs"][0]
    datatype, shape = spec.get("datatype"), spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _bad(f"Input shape {shape!r} is not a list of non-negative integers.")
    raw = _binary_part(spec, binary)
    if datatype == "FP32":
        tensor, images = _fp32(spec, shape, raw), None
    elif datatype == "BYTES":
        tensor, images = None, _bytes(spec, shape, raw)
    else:
        raise _bad(f"Input datatype {datatype!r} is not served: send FP32 or BYTES.")
    return InferCall(_request_id(request), tensor, images, _outputs(request))


def _binary_part(spec: dict[str, Any], binary: bytes) -> bytes | None:
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
        return None
    size = parameters["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise _bad(
            f"binary_data_size {size!r} does not match the {len(binary)} bytes after the "
            "JSON header."
        )
    return binary


def _fp32(spec: dict[str, Any], shape: list[int], raw: bytes | None) -> np.ndarray:
    if len(shape) != 4:
        raise _bad(f"An FP32 input has shape [N, 3, H, W]; {shape} given.")
    expected = math.prod(shape)
    if raw is not None:
        if len(raw) != expected * 4:
            raise _bad(f"{len(raw)} bytes of FP32 data do not fill shape {shape}.")
        tensor = np.frombuffer(raw, dtype="<f4")
    else:
        data = spec.get("data")
        try:
            tensor = np.asarray(data, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise _bad("The FP32 input's data is not a list of numbers.") from None
        if tensor.size != expected:
            raise _bad(f"{tensor.size} FP32 values do not fill shape {shape}.")
    if not np.isfinite(tensor).all() or (tensor.size and np.abs(tensor).max() > MAX_FP32_VALUE):
        raise _bad(
            f"The FP32 input holds NaN, infinite or values beyond +-{MAX_FP32_VALUE:g}: send "
            "images normalised as the model's preprocessing says (they lie within about +-3)."
        )
    return np.ascontiguousarray(tensor.reshape(shape), dtype=np.float32)


def _bytes(spec: dict[str, Any], shape: list[int], raw: bytes | None) -> list[bytes]:
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise _bad(f"A BYTES input has shape [N] or [N, 1] (one encoded image each); {shape}.")
    if raw is not None:
        elements, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise _bad("The BYTES data ends inside an element's 4-byte length.")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise _bad("A BYTES element is longer than the data left.")
            elements.append(raw[offset : offset + length])
            offset += length
    else:
        data = spec.get("data")
        if not isinstance(data, list) or not all(isinstance(e, str) for e in data):
            raise _bad("The BYTES input's data must be a list of base64 strings.")
        try:
            elements = [base64.b64decode(e, validate=True) for e in data]
        except (binascii.Error, ValueError):
            raise _bad("The BYTES input's data is not base64.") from None
    if len(elements) != shape[0]:
        raise _bad(f"{len(elements)} BYTES elements given for shape {shape}.")
    return elements


def _request_id(request: dict[str, Any]) -> str | None:
    value = request.get("id")
    return value if isinstance(value, str) else None


def _outputs(request: dict[str, Any]) -> list[tuple[str, bool]]:
    """(name, binary) per output to answer, in order."""
    parameters = request.get("parameters") or {}
    binary_default = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    wanted = request.get("outputs")
    if wanted is None:
        return [(name, binary_default) for name in OUTPUTS]
    if not isinstance(wanted, list) or not all(
        isinstance(o, dict)
        and o.get("name") in OUTPUTS
        and isinstance(o.get("parameters") or {}, dict)
        for o in wanted
    ):
        raise _bad(
            f'\'outputs\' must be a list of {{"name": one of {list(OUTPUTS)}, "parameters": '
            "{...}}."
        )
    return [
        (o["name"], (o.get("parameters") or {}).get("binary_data", binary_default) is True)
        for o in wanted
    ]


def _probabilities(model: ServedModel, call: InferCall, max_pixels: int) -> np.ndarray:
    if call.images is not None:
        batch = preprocess_images(model, [(None, data) for data in call.images], max_pixels)
    else:
        batch = call.tensor
        expected = (len(batch), *model.preprocessing.input_size)
        if batch.shape != expected:
            raise _bad(
                f"The FP32 input has shape {list(batch.shape)}; this model takes {list(expected)}."
            )
    return softmax(model.logits(batch))


def infer_response(
    call: InferCall, model: ServedModel, name: str, probabilities: np.ndarray
) -> Response:
    """The protocol's answer, JSON or with the binary tensor extension."""
    labels = [model.labels[i] for i in probabilities.argmax(axis=1)]
    tensors = {
        "probabilities": ("FP64", list(probabilities.shape), probabilities),
        "label": ("BYTES", [len(labels)], labels),
    }
    outputs, binary_parts = [], []
    for output, binary in call.outputs:
        datatype, shape, value = tensors[output]
        entry: dict[str, Any] = {"name": output, "datatype": datatype, "shape": shape}
        if binary:
            raw = (
                value.astype("<f8").tobytes()
                if datatype == "FP64"
                else b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in value)
            )
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary_parts.append(raw)
        else:
            entry["data"] = value.reshape(-1).tolist() if datatype == "FP64" else value
        outputs.append(entry)
    answer: dict[str, Any] = {"model_name": name, "model_version": model.version}
    if call.request_id is not None:
        answer["id"] = call.request_id
    answer["outputs"] = outputs
    if not binary_parts:
        return JSONResponse(answer)
    head = json.dumps(answer).encode()
    return Response(
        head + b"".join(binary_parts),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
