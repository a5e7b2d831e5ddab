"""Small file helpers: every write goes to a temporary name first, then is renamed into place;
reads open only regular files."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from graft.errors import MissingInputError


def temporary_beside(path: Path) -> Path:
    """A new, empty, uniquely named hidden file in ``path``'s folder (same file system, so a
    rename is atomic).

    Its mode is 0o666 less the umask, as for any file a program creates (``tempfile.mkstemp``
    would make it 0o600, and a renamed file keeps its mode: a server running as another user,
    as the serving container does, could not read a promoted model).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        name = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return name


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed.

    A reader never sees half a file, and a failed write leaves the previous file as it was.
    """
    temporary = temporary_beside(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class NotARegularFile(OSError):
    """The path is a FIFO, socket or device now, whatever it was when the folder was listed."""


@contextmanager
def open_regular_file(path: Path) -> Iterator[BinaryIO]:
    """Open ``path`` for reading without ever blocking: a FIFO put there after the folder was
    listed is refused (O_NONBLOCK, then fstat) instead of waiting for a writer forever.

    Raises:
        NotARegularFile: for a FIFO, socket or device.
        OSError: as ``open`` does (missing, a broken link, permission denied, ...).
    """
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise NotARegularFile(path)
    with os.fdopen(descriptor, "rb") as file:
        yield file


def write_text_atomic(path: Path, text: str) -> None:
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    """Parse a JSON file another stage wrote.

    Raises:
        MissingInputError: if the file does not exist yet.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingInputError(path) from None
