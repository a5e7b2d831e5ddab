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
    "server_limits": {...}, "reload": {"interval_s", "reloads", "failed_reloads",
    "last_error"}}``.
``GET /metrics``
    Prometheus text (:mod:`graft.serving.observability`).
``/v2/...``
    The Open Inference Protocol (:mod:`graft.serving.v2`), errors ``{"error": "..."}``.
``GET /docs``, ``/redoc``, ``/openapi.json``
    The API contract (request bodies, answers, error schemas) and its UIs (off with
    ``--no-docs``, except ``/openapi.json``).

Every answer carries ``X-Request-ID`` (the client's, or a new one).

Errors are ``{"detail": {"reason": "<code>", "message": "<what and what to do>"}}``:

- 400 ``empty``, ``not_an_image``, ``truncated``, ``unsupported_format``, ``too_small`` (the
  image decoder's reasons, as in training's quarantine), ``empty_batch``;
- 413 ``body_too_large`` (``--max-body-bytes``), ``too_many_pixels`` (``--max-pixels``, checked
  from the header before decoding), ``batch_too_large`` (``--max-batch``);
- 415 ``unsupported_media_type`` (neither an image nor multipart);
- 422 ``malformed_multipart``, ``not_a_file`` (a text field in the form), ``invalid_parameter``
  (``top_k``), with FastAPI's ``errors`` list for the latter;
- 408 ``body_timeout`` (``--body-timeout``; ``header_timeout`` comes from the protocol,
  :mod:`graft.serving.server`);
- 500 ``non_finite_output`` only if the model itself produces NaN or infinity: a NaN never
  reaches a response;
- 503 ``too_many_uploads`` (``--max-concurrent-uploads``) and ``too_many_connections``
  (``--max-connections``, from the protocol), with ``Retry-After``.

Reload: a background thread ``stat``s the model file every ``--reload-interval`` seconds. When
its inode, size or mtime change (promotion replaces ``models/production/model.onnx`` by an
atomic rename), the new file is loaded and warmed beside the old one, then one reference is
swapped. A request keeps the model it started with, so none fails or mixes two models; a file
that does not load (or cannot be read) is reported in ``/metadata``'s ``reload.last_error``,
counted in ``reload.failed_reloads`` and ``graft_model_reload_failures_total``, and the old
model stays.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from python_multipart.exceptions import FormParserError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from graft.serving.contract import PREDICT_BODY, PREDICT_ERRORS, Health, PredictResponse, Ready
from graft.serving.inputs import (
    RequestRejected,
    UploadSlots,
    check_batch,
    classify_images,
    read_body,
)
from graft.serving.limits import Limits, ServerLimits
from graft.serving.model import (
    FileIdentity,
    ModelError,
    NonFiniteOutputError,
    ServedModel,
    load_model,
)
from graft.serving.observability import Metrics, Observe
from graft.serving.settings import ServeSettings
from graft.serving.v2 import v2_error, v2_router

log = logging.getLogger("graft.serving")

RAW_MEDIA_TYPES = ("application/octet-stream",)


class ReloadingModel:
    """The model being served, replaced when its file is.

    ``current`` is read once per request and never mutated: a reload builds and warms a new
    :class:`ServedModel`, then rebinds ``current`` (one atomic reference assignment).
    ``on_reload(model)`` and ``on_failure(message)`` are told of each outcome.
    """

    def __init__(
        self,
        path: Path,
        interval_s: float,
        threads: int | None = None,
        on_reload: Callable[[ServedModel], None] = lambda model: None,
        on_failure: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.path, self.interval_s, self.threads = Path(path), interval_s, threads
        self.on_reload, self.on_failure = on_reload, on_failure
        self.current = self._load()
        self.loaded_at = _now()
        self.reloads = 0
        self.failed_reloads = 0
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
        except (ModelError, OSError) as exc:  # OSError: e.g. a file the server may not read
            self._failed = identity
            self.failed_reloads += 1
            self.last_error = f"{exc}; still serving {self.current.version}"
            log.warning("graft serve: reload refused: %s", self.last_error)
            self.on_failure(self.last_error)
            return False
        previous, self.current = self.current, model
        self.loaded_at, self.reloads, self.last_error, self._failed = (
            _now(),
            self.reloads + 1,
            None,
            None,
        )
        log.info("graft serve: reloaded %s: %s -> %s", self.path, previous.version, model.version)
        self.on_reload(model)
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
            except Exception as exc:  # the watcher must outlive any surprise; the old model
                self.last_error = f"reload check failed: {exc!r}"  # serves on, and it is told
                log.exception("graft serve: reload check failed")


@dataclass
class ServingState:
    """What every route shares: the model, the limits, the upload slots and the metrics."""

    model: ReloadingModel
    model_name: str
    limits: Limits
    server_limits: ServerLimits
    uploads: UploadSlots
    metrics: Metrics

    async def read_body(self, request: Request) -> bytes:
        return await read_body(
            request, self.limits.max_body_bytes, self.server_limits.body_timeout_s
        )


def create_app(settings: ServeSettings) -> FastAPI:
    """The FastAPI application serving ``settings.model_path``; loads and warms the model first.

    Raises:
        ModelError: if the model cannot be served (before anything listens).
    """
    limits, metrics = settings.limits, Metrics()
    served = ReloadingModel(
        Path(settings.model_path),
        settings.reload_interval_s,
        settings.threads,
        on_reload=lambda model: (
            metrics.reloads.inc(),
            metrics.serving(model.sha256, model.version),
        ),
        on_failure=lambda message: metrics.reload_failures.inc(),
    )
    metrics.serving(served.current.sha256, served.current.version)
    state = ServingState(
        served,
        settings.model_name,
        limits,
        settings.server_limits,
        UploadSlots(
            settings.server_limits.max_concurrent_uploads, settings.server_limits.retry_after_s
        ),
        metrics,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        served.start()
        try:
            yield
        finally:
            served.stop()

    docs = "/docs" if settings.docs else None
    app = FastAPI(
        title="graft serve",
        version=served.current.version,
        description="Image classification with the exported ONNX model. Errors are "
        '`{"detail": {"reason", "message"}}` (the Open Inference Protocol\'s under /v2: '
        '`{"error"}`).',
        lifespan=lifespan,
        docs_url=docs,
        redoc_url="/redoc" if settings.docs else None,
    )
    app.state.serving = state
    app.add_middleware(Observe, metrics=metrics)
    _add_error_handlers(app)

    @app.get("/healthz", response_model=Health, summary="Liveness: the process runs")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, summary="Readiness: a model is loaded and warm")
    def readyz() -> dict[str, Any]:
        return {"status": "ready", "model": _model_ref(served.current)}

    @app.get("/metadata", summary="Labels, preprocessing, the model file, limits, reloads")
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
            "server_limits": asdict(settings.server_limits),
            "reload": {
                "interval_s": served.interval_s,
                "reloads": served.reloads,
                "failed_reloads": served.failed_reloads,
                "last_error": served.last_error,
            },
        }

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=PREDICT_ERRORS,
        openapi_extra=PREDICT_BODY,
        summary="Classify one image (raw body) or several (multipart)",
    )
    async def predict(
        request: Request,
        top_k: int | None = Query(None, ge=1, description="labels per image, most probable first"),
    ) -> JSONResponse:
        model = served.current  # this request's model, whatever a reload does meanwhile
        request.state.model_version = model.version
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        multipart = media_type == "multipart/form-data"
        if not multipart and not (media_type.startswith("image/") or media_type in RAW_MEDIA_TYPES):
            raise RequestRejected(
                415,
                "unsupported_media_type",
                f"Content-Type '{media_type or '(none)'}' is not accepted: send one image as "
                "the body (image/* or application/octet-stream) or images as multipart/form-data.",
            )
        async with state.uploads.take():
            body = await state.read_body(request)
            images = await _multipart_images(request, body) if multipart else [(None, body)]
            request.state.images = len(images)
            check_batch(len(images), limits.max_batch)
            k = top_k or limits.default_top_k
            predictions = await run_in_threadpool(
                classify_images, model, images, k, limits.max_pixels
            )
        return JSONResponse(
            {
                "model": _model_ref(model),
                "predictions": [
                    {"filename": name, **prediction.as_dict()}
                    for (name, _), prediction in zip(images, predictions, strict=True)
                ],
            }
        )

    app.include_router(v2_router(state))
    return app


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
    def error(
        request: Request,
        status: int,
        reason: str,
        message: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> JSONResponse:
        request.state.reason = reason  # counted by reason in /metrics
        if request.url.path.startswith("/v2"):  # the Open Inference Protocol's shape
            return v2_error(status, message, headers)
        return JSONResponse(
            {"detail": {"reason": reason, "message": message, **extra}},
            status_code=status,
            headers=headers,
        )

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, exc: RequestRejected) -> JSONResponse:
        return error(request, exc.status, exc.reason, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors()
        ]
        return error(request, 422, "invalid_parameter", problems, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = str(exc.detail).lower().replace(" ", "_")
        return error(request, exc.status_code, reason, str(exc.detail), exc.headers)

    @app.exception_handler(NonFiniteOutputError)
    async def non_finite(request: Request, exc: NonFiniteOutputError) -> JSONResponse:
        log.error("graft serve: %s", exc)
        return error(request, 500, "non_finite_output", str(exc))


def _model_ref(model: ServedModel) -> dict[str, str]:
    return {"sha256": model.sha256, "version": model.version}


def _zeros(model: ServedModel) -> np.ndarray:
    return np.zeros((1, *model.preprocessing.input_size), np.float32)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
