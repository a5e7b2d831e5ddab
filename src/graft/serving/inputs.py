"""Reading what a request sends to ``graft serve``, within limits, and refusing it clearly.

Shared by graft's own ``/predict`` and the Open Inference Protocol's ``infer``
(:mod:`graft.serving.v2`): the body read under a size cap and a time limit, a cap on the
uploads in progress at once, and images classified as training decodes them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
from starlette.requests import Request

from graft.data.images import ImageRejected
from graft.serving.model import Prediction, ServedModel, decode


class RequestRejected(Exception):
    """A request the server refuses: becomes ``{"detail": {"reason", "message"}}``.

    ``headers`` go into the answer (``Retry-After`` on a 503).
    """

    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.headers = headers or {}


class UploadSlots:
    """At most ``limit`` uploads read or classified at once; one more is refused, not queued.

    Refusing (503 with ``Retry-After``) rather than queueing bounds the memory that bodies
    waiting for their turn would hold. One event loop per worker: no lock is needed.
    """

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit, self.retry_after_s, self.in_use = limit, retry_after_s, 0

    @asynccontextmanager
    async def take(self) -> AsyncIterator[None]:
        if self.in_use >= self.limit:
            raise RequestRejected(
                503,
                "too_many_uploads",
                f"{self.in_use} uploads are in progress, the most this server takes at once "
                f"(--max-concurrent-uploads {self.limit}): retry after {self.retry_after_s} s.",
                {"Retry-After": str(self.retry_after_s)},
            )
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with a 413 as soon as it exceeds ``limit`` bytes, or a 408 when it
    takes longer than ``timeout_s`` seconds to arrive."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)

    async def receive_all() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(None, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(receive_all(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestRejected(
            408,
            "body_timeout",
            f"The body did not arrive within {timeout_s:g} s (--body-timeout): send it at once.",
            {"Connection": "close"},
        ) from None


def _too_large(size: int | None, limit: int) -> RequestRejected:
    """``size`` is the declared length, or None while streaming (past the limit so far)."""
    has = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return RequestRejected(
        413, "body_too_large", f"The body has {has}; the limit is {limit} (--max-body-bytes)."
    )


def check_batch(count: int, max_batch: int) -> None:
    """Raises RequestRejected unless 1 <= count <= max_batch."""
    if count == 0:
        raise RequestRejected(400, "empty_batch", "The request holds no image.")
    if count > max_batch:
        raise RequestRejected(
            413,
            "batch_too_large",
            f"{count} images in one request; the limit is {max_batch} (--max-batch): "
            "split the batch.",
        )


def preprocess_images(
    model: ServedModel, images: list[tuple[str | None, bytes]], max_pixels: int
) -> np.ndarray:
    """Decode and preprocess each image as training does: an ``(N, 3, H, W)`` batch.

    Raises:
        RequestRejected: naming the first unusable image and why (400, or 413 if too large).
    """
    arrays = []
    for index, (name, data) in enumerate(images):
        try:
            arrays.append(model.preprocess(decode(data, max_pixels)))
        except ImageRejected as exc:
            status = 413 if exc.reason == "too_many_pixels" else 400
            which = f"image {index}" + (f" ({name})" if name else "")
            message = f"{which} is not usable ({exc.reason}): {exc.detail}"
            raise RequestRejected(status, exc.reason, message) from None
        except MemoryError:  # whatever the loader's bounds miss is still the input's size
            which = f"image {index}" + (f" ({name})" if name else "")
            raise RequestRejected(
                413, "too_large_to_process", f"{which} needs more memory than the server has."
            ) from None
    return np.stack(arrays)


def classify_images(
    model: ServedModel, images: list[tuple[str | None, bytes]], top_k: int, max_pixels: int
) -> list[Prediction]:
    return model.classify(preprocess_images(model, images, max_pixels), top_k)
