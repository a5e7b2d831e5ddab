"""What an operator sees of ``graft serve``: Prometheus metrics, request ids and log lines.

- :class:`Metrics`: the server's Prometheus metrics (``prometheus-client``) in one registry;
  with several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set before the workers start)
  ``/metrics`` adds up every worker's.
- :class:`Observe`: ASGI middleware. It takes a client's ``X-Request-ID`` (or makes one),
  echoes it in the response, counts and times the request and writes one log line per request
  (id, method, endpoint, status, latency, images, model version).
- :func:`log_config`: the ``logging`` set-up for uvicorn and graft, plain text or one JSON
  object per line; every line carries the request id (``-`` outside a request).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
import uuid
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

REQUEST_ID_HEADER = "x-request-id"
# A client's id is kept if it is short and printable ASCII; anything else is replaced, so a
# log line or a response header can never be forged through it.
_VALID_REQUEST_ID = re.compile(r"[!-~]{1,128}")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
access_log = logging.getLogger("graft.serving.access")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's metrics, registered in a registry of their own (one per application)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        where = {"registry": self.registry}
        self.requests = Counter(
            "graft_requests",
            "HTTP requests answered, by endpoint (route template), method and status.",
            ["endpoint", "method", "status"],
            **where,
        )
        self.latency = Histogram(
            "graft_request_duration_seconds",
            "Time from the request's arrival to its answer, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            **where,
        )
        self.images = Histogram(
            "graft_images_per_request",
            "Images classified per successful prediction request.",
            buckets=IMAGE_BUCKETS,
            **where,
        )
        self.rejections = Counter(
            "graft_rejections",
            "Requests refused, by reason (e.g. not_an_image, body_too_large, too_many_uploads).",
            ["reason"],
            **where,
        )
        self.reloads = Counter(
            "graft_model_reloads", "Replaced model files loaded and swapped in.", **where
        )
        self.reload_failures = Counter(
            "graft_model_reload_failures",
            "Replaced model files that could not be served (the old model kept serving).",
            **where,
        )
        # An info metric: constant 1, the model as labels. A gauge, so that it also works with
        # several workers (prometheus_client's Info does not), each worker its own series.
        self.model = Gauge(
            "graft_model_info",
            "The model being served: its sha256 and version (1 while served).",
            ["sha256", "version"],
            multiprocess_mode="livemax",
            **where,
        )
        self._model_labels: tuple[str, str] | None = None

    def serving(self, sha256: str, version: str) -> None:
        """Point the info metric at the model now served."""
        if self._model_labels is not None and self._model_labels != (sha256, version):
            self.model.labels(*self._model_labels).set(0)  # what a worker file keeps
            self.model.remove(*self._model_labels)
        self._model_labels = (sha256, version)
        self.model.labels(sha256, version).set(1)

    def exposition(self) -> tuple[bytes, str]:
        """The text ``/metrics`` answers, and its content type."""
        registry = self.registry
        if self.multiprocess:  # every worker's values, read from the shared folder
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST


class Observe:
    """ASGI middleware: request id, metrics and the per-request log line.

    A handler reports what it did through ``request.state`` (``images``, ``model_version``,
    ``reason``): the middleware reads them when the answer is complete.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        # Not reset afterwards: each request runs in a task of its own (a copy of the context),
        # so uvicorn's own line about an exception escaping the application keeps the id too.
        request_id_var.set(request_id)
        state = scope.setdefault("state", {})
        status = 500

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                headers.append((b"x-request-id", request_id.encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, state, status, time.perf_counter() - started, request_id)

    def _record(self, scope: dict, state: dict, status: int, seconds: float, rid: str) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(seconds)
        images = state.get("images")
        if images and status < 400:
            self.metrics.images.observe(images)
        if state.get("reason"):
            self.metrics.rejections.labels(state["reason"]).inc()
        access_log.info(
            "%s %s %s %d %.1f ms",
            scope["method"],
            scope["path"],
            f"HTTP/{scope.get('http_version', '1.1')}",
            status,
            seconds * 1000,
            extra={
                "request_id": rid,
                "method": scope["method"],
                "path": scope["path"],
                "endpoint": endpoint,
                "status": status,
                "latency_ms": round(seconds * 1000, 3),
                "images": images,
                "model_version": state.get("model_version"),
                "reason": state.get("reason"),
                "client": _client(scope),
            },
        )


def _client(scope: dict) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


def _request_id(scope: dict) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _VALID_REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


# The fields Observe adds to a request's line, written by the JSON formatter when present.
_REQUEST_FIELDS = (
    "method",
    "path",
    "endpoint",
    "status",
    "latency_ms",
    "images",
    "model_version",
    "reason",
    "client",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and request fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        for key in _REQUEST_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


JsonFormatter.converter = time.gmtime  # type: ignore[assignment]

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")


def log_config(log_format: str = "text", level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn's and graft's loggers.

    Raises:
        ValueError: if ``log_format`` is not one of ``LOG_FORMATS``.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format '{log_format}' is not one of {list(LOG_FORMATS)}")
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"}
        if log_format == "json"
        else {"format": TEXT_FORMAT, "datefmt": "%Y-%m-%dT%H:%M:%S"}
    )
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "graft",
        "filters": ["request_id"],
        "stream": "ext://sys.stderr",
    }
    logger = {"handlers": ["default"], "level": level, "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {"graft": formatter},
        "handlers": {"default": handler},
        "loggers": {"uvicorn": logger, "uvicorn.error": {"level": level}, "graft": logger},
    }
