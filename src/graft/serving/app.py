"""The HTTP server of ``graft serve``: FastAPI over onnxruntime, with limits and hot reload.

Endpoints (all answers are JSON):

``POST /predict[?top_k=K]``
    One image as the raw body (``Content-Type: image/*`` or ``application/octet-stream``), or
    one or more images as ``multipart/form-data`` file parts (any field name, in order). Answer::

        {
          "model": {"sha256": "<hex>", "version": "<first 12 hex of sha256>"},
          "predictions": [
            {
              "filename": "cat.jpg",          # the part's file name; null for a raw body
              "label": "cat",                 # the most probable label
              "probability": 0.93,            # its softmax probability
              "top_k": [{"label": "cat", "probability": 0.93}, ...]   # most probable first
            }
          ]
        }

    ``predictions`` holds one entry per image, in the order sent. ``top_k`` defaults to
    ``--top-k`` and is capped at the number of labels. ``model`` names the model that
    answered (it changes when the file is replaced; see reload below).

``GET /healthz``
    ``{"status": "ok"}`` while the process runs.
``GET /readyz``
    ``{"status": "ready", "model": {"sha256": ..., "version": ...}}``: a model is loaded and
    warm (the server only starts listening once it is).
``GET /metadata``
    ``{"labels": [...], "preprocessing": {...timm data config...}, "model": {"path", "sha256",
    "version", "bytes", "loaded_at"}, "metadata": {...the ONNX metadata...}, "limits": {...},
    "reload": {"interval_s", "reloads", "last_error"}}``.

Errors are ``{"detail": {"reason": "<code>", "message": "<what and what to do>"}}``:

- 400 ``empty``, ``not_an_image``, ``truncated``, ``unsupported_format``, ``too_small`` (the
  image decoder's reasons, as in training's quarantine), ``empty_batch``;
- 413 ``body_too_large`` (``--max-body-bytes``), ``too_many_pixels`` (``--max-pixels``, checked
  from the header before decoding), ``batch_too_large`` (``--max-batch``);
- 415 ``unsupported_media_type`` (neither an image nor multipart);
- 422 ``malformed_multipart``, ``not_a_file`` (a text field in the form), ``invalid_parameter``
  (``top_k``), with FastAPI's ``errors`` list for the latter;
- 500 ``non_finite_output`` only if the model itself produces NaN or infinity: a NaN never
  reaches a response.

Reload: a background thread ``stat``s the model file every ``--reload-interval`` seconds. When
its inode, size or mtime change (promotion replaces ``models/production/model.onnx`` by an
atomic rename), the new file is loaded and warmed beside the old one, then one reference is
swapped. A request keeps the model it started with, so none fails or mixes two models; a file
that does not load is reported in ``/metadata``'s ``reload.last_error`` and the old model
stays.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from python_multipart.exceptions import FormParserError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from graft.data.images import ImageRejected
from graft.serving.limits import Limits
from graft.serving.model import (
    FileIdentity,
    ModelError,
    NonFiniteOutputError,
    Prediction,
    ServedModel,
    decode,
    load_model,
)

log = logging.getLogger("graft.serving")

RAW_MEDIA_TYPES = ("application/octet-stream",)


class RequestRejected(Exception):
    """A request the server refuses: becomes ``{"detail": {"reason", "message"}}``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class ReloadingModel:
    """The model being served, replaced when its file is.

    ``current`` is read once per request and never mutated: a reload builds and warms a new
    :class:`ServedModel`, then rebinds ``current`` (one atomic reference assignment).
    """

    def __init__(self, path: Path, interval_s: float, threads: int | None = None) -> None:
        self.path, self.interval_s, self.threads = Path(path), interval_s, threads
        self.current = self._load()
        self.loaded_at = _now()
        self.reloads = 0
        self.last_error: str | None = None
        self._failed: FileIdentity | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load(self) -> ServedModel:
        model = load_model(self.path, threads=self.threads)
        model.session.run(None, {model.input_name: _zeros(model)})  # warm before it serves
        return model

    def check(self) -> bool:
        """Load the file again if it changed on disk; True when a new model was swapped in."""
        try:
            identity = FileIdentity.of(os.stat(self.path))
        except OSError as exc:  # between an unlink and a rename, or a mistake: keep serving
            self.last_error = f"{self.path}: {exc.strerror}; still serving {self.current.version}"
            return False
        if identity in (self.current.identity, self._failed):
            return False
        try:
            model = self._load()
        except ModelError as exc:
            self._failed = identity
            self.last_error = f"{exc}; still serving {self.current.version}"
            log.warning("graft serve: reload refused: %s", self.last_error)
            return False
        previous, self.current = self.current, model
        self.loaded_at, self.reloads, self.last_error, self._failed = (
            _now(),
            self.reloads + 1,
            None,
            None,
        )
        log.info("graft serve: reloaded %s: %s -> %s", self.path, previous.version, model.version)
        return True

    def start(self) -> None:
        if self.interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="graft-reload", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # the watcher must outlive any surprise; the old model serves on
                log.exception("graft serve: reload check failed")


def create_app(
    model_path: str | Path,
    limits: Limits | None = None,
    reload_interval_s: float = 2.0,
    threads: int | None = None,
) -> FastAPI:
    """The FastAPI application serving ``model_path``; loads and warms the model first.

    Raises:
        ModelError: if the model cannot be served (before anything listens).
    """
    limits = limits or Limits()
    served = ReloadingModel(Path(model_path), reload_interval_s, threads)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        served.start()
        try:
            yield
        finally:
            served.stop()

    app = FastAPI(title="graft serve", lifespan=lifespan)
    app.state.model = served
    _add_error_handlers(app)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, Any]:
        return {"status": "ready", "model": _model_ref(served.current)}

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        model = served.current
        return {
            "labels": list(model.labels),
            "preprocessing": model.preprocessing.as_config(),
            "model": {
                "path": str(model.path),
                "sha256": model.sha256,
                "version": model.version,
                "bytes": model.identity.size,
                "loaded_at": served.loaded_at,
            },
            "metadata": model.metadata,
            "limits": asdict(limits),
            "reload": {
                "interval_s": served.interval_s,
                "reloads": served.reloads,
                "last_error": served.last_error,
            },
        }

    @app.post("/predict")
    async def predict(
        request: Request,
        top_k: int | None = Query(None, ge=1, description="labels per image, most probable first"),
    ) -> JSONResponse:
        model = served.current  # this request's model, whatever a reload does meanwhile
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        multipart = media_type == "multipart/form-data"
        if not multipart and not (media_type.startswith("image/") or media_type in RAW_MEDIA_TYPES):
            raise RequestRejected(
                415,
                "unsupported_media_type",
                f"Content-Type '{media_type or '(none)'}' is not accepted: send one image as "
                "the body (image/* or application/octet-stream) or images as multipart/form-data.",
            )
        body = await _read_body(request, limits.max_body_bytes)
        if multipart:
            images = await _multipart_images(request, body)
        else:
            images = [(None, body)]
        if not images:
            raise RequestRejected(400, "empty_batch", "The form holds no image files.")
        if len(images) > limits.max_batch:
            raise RequestRejected(
                413,
                "batch_too_large",
                f"{len(images)} images in one request; the limit is {limits.max_batch} "
                "(--max-batch): split the batch.",
            )
        k = top_k or limits.default_top_k
        predictions = await run_in_threadpool(_classify, model, images, k, limits.max_pixels)
        return JSONResponse(
            {
                "model": _model_ref(model),
                "predictions": [
                    {"filename": name, **prediction.as_dict()}
                    for (name, _), prediction in zip(images, predictions, strict=True)
                ],
            }
        )

    return app


def _classify(
    model: ServedModel, images: list[tuple[str | None, bytes]], top_k: int, max_pixels: int
) -> list[Prediction]:
    arrays = []
    for index, (name, data) in enumerate(images):
        try:
            arrays.append(model.preprocess(decode(data, max_pixels)))
        except ImageRejected as exc:
            status = 413 if exc.reason == "too_many_pixels" else 400
            which = f"image {index}" + (f" ({name})" if name else "")
            message = f"{which} is not usable ({exc.reason}): {exc.detail}"
            raise RequestRejected(status, exc.reason, message) from None
    return model.classify(np.stack(arrays), top_k)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(None, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int | None, limit: int) -> RequestRejected:
    """``size`` is the declared length, or None while streaming (past the limit so far)."""
    has = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return RequestRejected(
        413, "body_too_large", f"The body has {has}; the limit is {limit} (--max-body-bytes)."
    )


async def _multipart_images(request: Request, body: bytes) -> list[tuple[str | None, bytes]]:
    async def replay() -> AsyncIterator[bytes]:
        yield body

    # The body is already bounded by --max-body-bytes, so the parser's own count limits only
    # need to be generous; --max-batch is checked on the result, to answer 413, not 422.
    parser = MultiPartParser(
        request.headers, replay(), max_files=len(body) + 1, max_fields=len(body) + 1
    )
    try:
        form = await parser.parse()
    except (MultiPartException, FormParserError) as exc:
        raise RequestRejected(
            422, "malformed_multipart", f"The multipart body cannot be parsed: {exc}"
        ) from None
    try:
        images = []
        for name, value in form.multi_items():
            if not isinstance(value, UploadFile):
                raise RequestRejected(
                    422,
                    "not_a_file",
                    f"Form field '{name}' is text, not a file: send each image as a file part.",
                )
            images.append((value.filename, await value.read()))
        return images
    finally:
        await form.close()


def _add_error_handlers(app: FastAPI) -> None:
    def error(status: int, reason: str, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse(
            {"detail": {"reason": reason, "message": message, **extra}}, status_code=status
        )

    @app.exception_handler(RequestRejected)
    async def rejected(_: Request, exc: RequestRejected) -> JSONResponse:
        return error(exc.status, exc.reason, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors()
        ]
        return error(422, "invalid_parameter", problems, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = str(exc.detail).lower().replace(" ", "_")
        return error(exc.status_code, reason, str(exc.detail))

    @app.exception_handler(NonFiniteOutputError)
    async def non_finite(_: Request, exc: NonFiniteOutputError) -> JSONResponse:
        log.error("graft serve: %s", exc)
        return error(500, "non_finite_output", str(exc))


def run_server(
    model_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    reload_interval_s: float = 2.0,
    threads: int | None = None,
) -> None:
    """Serve ``model_path`` with uvicorn until SIGINT/SIGTERM (in-flight requests finish).

    Raises:
        ModelError: if the model cannot be served; nothing listens then.
    """
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    app = create_app(model_path, limits, reload_interval_s, threads)
    log_config = copy.deepcopy(LOGGING_CONFIG)  # graft's reload messages beside uvicorn's own
    log_config["loggers"]["graft"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config = uvicorn.Config(
        app, host=host, port=port, log_config=log_config, timeout_graceful_shutdown=30
    )
    uvicorn.Server(config).run()


def _model_ref(model: ServedModel) -> dict[str, str]:
    return {"sha256": model.sha256, "version": model.version}


def _zeros(model: ServedModel) -> np.ndarray:
    return np.zeros((1, *model.preprocessing.input_size), np.float32)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
