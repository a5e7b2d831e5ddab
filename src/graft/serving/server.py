"""Running ``graft serve``: uvicorn with graft's connection guard, one or several workers.

:class:`GuardedH11Protocol` is uvicorn's HTTP/1.1 protocol with what it lacks against slow or
greedy clients: a header timeout (a client that never finishes its headers, the "slowloris",
gets 408 and the socket back) and a connection cap answered by a JSON 503 with
``Retry-After`` (uvicorn's own ``limit_concurrency`` answers plain text, no ``Retry-After``).
The body timeout and the cap on concurrent uploads live in the application
(:mod:`graft.serving.inputs`).

Workers: ``--workers N`` starts N processes sharing the socket, each with its own model
session and ``threads`` onnxruntime threads; when ``threads`` is 0 each worker gets
``cores // N`` (at least 1), so N x threads fits the machine's cores. Limits apply per worker.
With several workers ``/metrics`` adds up every worker's counters (Prometheus' multiprocess
mode, in a temporary folder).

Nothing here imports prometheus_client at module level: with several workers it must first
be imported in the worker processes, after ``PROMETHEUS_MULTIPROC_DIR`` is set.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from graft.serving.limits import ServerLimits
from graft.serving.model import load_model
from graft.serving.settings import ServeSettings


@dataclass(frozen=True)
class AppFactory:
    """Builds the application in each worker (uvicorn's ``factory=True``)."""

    settings: ServeSettings

    def __call__(self) -> Any:
        from graft.serving.app import create_app

        return create_app(self.settings)


class GraftConfig(uvicorn.Config):
    """uvicorn's configuration, carrying graft's connection limits to the protocol."""

    def __init__(self, *args: Any, server_limits: ServerLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server_limits = server_limits


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a header timeout and a connection cap."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._limits: ServerLimits = getattr(self.config, "server_limits", ServerLimits())
        self._header_timer: asyncio.TimerHandle | None = None
        self._bytes_since_armed = False
        if len(self.connections) > self._limits.max_connections:
            # Its requests are answered 503 (the client reads a response, not a reset).
            self.app = _refusal(self._limits)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        self._bytes_since_armed = True
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._bytes_since_armed = False
        first = self.cycle is None
        self._header_timer = self.loop.call_later(
            self._limits.header_timeout_s, self._headers_late, self.cycle, first
        )

    def _headers_late(self, armed_with: object, first: bool) -> None:
        """No new request's headers since the timer was armed: close the connection."""
        if self.cycle is not armed_with or self.transport.is_closing():
            return
        if first or self._bytes_since_armed:  # a request was begun: say why it ends
            self.transport.write(_raw_408(self._limits.header_timeout_s))
        self.transport.close()


def _raw_408(timeout_s: float) -> bytes:
    body = json.dumps(
        {
            "detail": {
                "reason": "header_timeout",
                "message": f"The request's headers did not arrive within {timeout_s:g} s "
                "(--header-timeout).",
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _refusal(limits: ServerLimits) -> Any:
    body = json.dumps(
        {
            "detail": {
                "reason": "too_many_connections",
                "message": f"The server holds {limits.max_connections} connections, its limit "
                f"(--max-connections): retry after {limits.retry_after_s} s.",
            }
        }
    ).encode()

    async def refuse(scope: dict, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(limits.retry_after_s).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return refuse


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(threads: int, workers: int) -> int:
    """``threads`` if given, else the cores shared among ``workers`` (at least 1 each)."""
    return threads if threads > 0 else max(1, cores() // workers)


def run_server(
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    log_format: str = "text",
) -> None:
    """Serve until SIGINT/SIGTERM (in-flight requests finish).

    Raises:
        ModelError: if the model cannot be served; nothing listens then.
    """
    from graft.serving.observability import log_config

    load_model(settings.model_path, threads=1)  # a clear error before any worker starts
    config = GraftConfig(
        AppFactory(settings),
        factory=True,
        host=host,
        port=port,
        workers=workers,
        http=GuardedH11Protocol,
        log_config=log_config(log_format),
        access_log=False,  # graft.serving.access writes one line per request, with its id
        timeout_graceful_shutdown=30,
        server_limits=settings.server_limits,
    )
    server = uvicorn.Server(config)
    if workers <= 1:
        server.run()
        return
    import inspect

    from uvicorn.supervisors import Multiprocess

    metrics_dir = tempfile.mkdtemp(prefix="graft-serve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # uvicorn.run's own route; older uvicorn releases also take the target to run.
    extra = {"target": server.run} if "target" in inspect.signature(Multiprocess).parameters else {}
    try:
        Multiprocess(config, sockets=[config.bind_socket()], **extra).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
