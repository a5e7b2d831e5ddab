"""What one request may ask of ``graft serve``; light to import (the CLI reads the defaults)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_PIXELS = 40_000_000  # the training loader's default (params.yaml data.max_pixels)


@dataclass(frozen=True)
class Limits:
    """Requests beyond these get a 413; ``default_top_k`` applies when a request gives none.

    Attributes:
        max_body_bytes: the largest request body, checked before and while it is read.
        max_pixels: the largest width x height of one image, checked from its header.
        max_batch: the most images in one multipart request.
        default_top_k: labels per image when the request has no ``top_k``.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int = 32
    default_top_k: int = 5


@dataclass(frozen=True)
class ServerLimits:
    """What the whole server holds at once; past these a client gets a 503 or a 408, not a hang.

    They bound the memory and sockets a client can pin: at most ``max_connections`` sockets
    and ``max_concurrent_uploads`` bodies of ``Limits.max_body_bytes`` each, per worker.

    Attributes:
        max_connections: open connections per worker; a request on one more gets 503
            ``too_many_connections`` with ``Retry-After`` and the connection is closed.
        max_concurrent_uploads: requests with a body (``/predict``, ``/v2/.../infer``) being
            read or classified at once per worker; one more gets 503 ``too_many_uploads``.
        header_timeout_s: seconds a client has, from connecting (or from the end of the
            previous response), to send a request's complete headers; then 408 and close.
        body_timeout_s: seconds a client has to send a whole body; then 408 ``body_timeout``.
        retry_after_s: the ``Retry-After`` a 503 suggests.
    """

    max_connections: int = 256
    max_concurrent_uploads: int = 32
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    retry_after_s: int = 1
