"""The contract of graft's own API as OpenAPI documents it: what ``/docs`` shows and lets a
user try (request bodies, answers, error schemas). The handlers answer these shapes directly;
a test checks the schema a client reads from ``/openapi.json``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class TopLabel(BaseModel):
    label: str
    probability: float = Field(ge=0, le=1, description="softmax probability")


class ImagePrediction(BaseModel):
    filename: str | None = Field(description="the part's file name; null for a raw body")
    label: str = Field(description="the most probable label")
    probability: float = Field(ge=0, le=1)
    top_k: list[TopLabel] = Field(description="most probable first")


class ModelRef(BaseModel):
    sha256: str = Field(description="of the served ONNX file")
    version: str = Field(description="the first 12 hex digits of sha256")


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[ImagePrediction] = Field(description="one per image, in the order sent")


class ErrorDetail(BaseModel):
    reason: str = Field(description="a stable code, e.g. not_an_image, body_too_large")
    message: str = Field(description="what is wrong and what to do")


class ErrorResponse(BaseModel):
    detail: ErrorDetail


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    model: ModelRef


_BINARY = {"type": "string", "format": "binary"}
PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One image as the raw body (any image/* type or "
        "application/octet-stream), or images as multipart/form-data file parts (any field "
        "name, answered in order).",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {"files": {"type": "array", "items": _BINARY}},
                }
            },
            "image/png": {"schema": _BINARY},
            "image/jpeg": {"schema": _BINARY},
            "application/octet-stream": {"schema": _BINARY},
        },
    }
}


def _errors(*cases: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": text} for status, text in cases}


PREDICT_ERRORS = _errors(
    (
        400,
        "empty, not_an_image, truncated, unsupported_format, too_small, extreme_aspect_ratio, "
        "empty_batch",
    ),
    (408, "body_timeout: the body took longer than --body-timeout"),
    (413, "body_too_large, too_many_pixels, batch_too_large"),
    (415, "unsupported_media_type"),
    (422, "malformed_multipart, not_a_file, invalid_parameter"),
    (500, "non_finite_output: the model itself is broken"),
    (503, "too_many_uploads or too_many_connections; see Retry-After"),
)
