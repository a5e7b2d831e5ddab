"""Map a function over many items on every local core, or on a Dask cluster, results in order.

Used by validation (one call per image file). Items go out in chunks, so the per-task overhead
of a process pool or a scheduler is paid once per chunk, and results come back chunk by chunk
in the items' order: the caller's memory holds what it keeps, not the whole set twice.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

from graft.errors import GraftError

T = TypeVar("T")
R = TypeVar("R")
Mapper = Callable[[Callable[[T], R], Sequence[T]], Iterator[R]]

CHUNK = 256  # items per task: a few seconds of image checks, small enough to spread evenly
# Chunks in flight per worker. Results come back in order, so a worker that finishes early
# takes the next chunks in flight while a slower one (sharing its core) holds the oldest; with
# too few in flight it waits instead. The memory held is this many chunks' results.
IN_FLIGHT_PER_WORKER = 4


class ClusterUnreachable(GraftError):
    """The Dask scheduler named in params.yaml does not answer."""


def _apply(function: Callable[[T], R], chunk: Sequence[T]) -> list[R]:
    return [function(item) for item in chunk]


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def local_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def map_in_processes(
    function: Callable[[T], R], items: Sequence[T], *, workers: int | None = None
) -> Iterator[R]:
    """``function`` over ``items`` in a pool of ``workers`` processes (default: one per core).

    One worker, or a single chunk, runs in this process (no pool to start). ``function`` and the
    items must pickle (a module-level function, or a ``functools.partial`` of one).
    """
    workers = workers or local_cores()
    if workers <= 1 or len(items) <= CHUNK:
        yield from map(function, items)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from _in_order(lambda chunk: pool.submit(_apply, function, chunk), items, workers)


@contextmanager
def dask_mapper(address: str, setting: str) -> Iterator[Mapper]:
    """A mapper running on the Dask cluster whose scheduler is at ``address``.

    The workers must see the items' files at the same paths (a shared filesystem).
    ``setting`` names the params.yaml key the address came from, for the error message.
    """
    from dask.distributed import Client

    try:
        client = Client(address, timeout="30s")
    except (OSError, TimeoutError) as exc:
        raise ClusterUnreachable(
            f"Cannot reach the Dask scheduler at {address} ({setting} in params.yaml): {exc}. "
            "Start it with `dask scheduler` and workers with `dask worker ADDRESS`, or unset "
            "the key to run on this machine's cores."
        ) from exc

    def mapper(function: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
        workers = len(client.scheduler_info().get("workers", {}))
        return _in_order(
            lambda chunk: client.submit(_apply, function, chunk, pure=False), items, workers
        )

    with client:
        yield mapper


def mapper_for(address: str | None, setting: str) -> AbstractContextManager[Mapper]:
    """Where a run maps: the Dask cluster at ``address`` if given, else this machine's cores."""
    return dask_mapper(address, setting) if address else nullcontext(map_in_processes)


def _in_order(
    submit: Callable[[Sequence[T]], Any], items: Sequence[T], workers: int
) -> Iterator[R]:
    """Submit chunks, IN_FLIGHT_PER_WORKER per worker, and yield their results in the items'
    order."""
    chunks = _chunks(items, CHUNK)
    pending = deque(
        submit(chunk) for chunk in itertools.islice(chunks, IN_FLIGHT_PER_WORKER * max(1, workers))
    )
    while pending:
        done = pending.popleft().result()
        following = next(chunks, None)
        if following is not None:
            pending.append(submit(following))
        yield from done
