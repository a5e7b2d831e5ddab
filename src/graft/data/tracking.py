"""What DVC cannot version under the data folder, found before DVC is asked to.

DVC follows every link when it hashes ``data/``: a broken link or a link loop makes ``dvc status``,
``dvc add`` and ``dvc repro`` fail, a FIFO makes them wait forever, and a link to a file outside
the data folder copies that file into the DVC cache (and on to the remote) while ``dvc add`` or
``dvc repro`` replaces the link by the copy. ``graft validate`` alone quarantines such entries;
a project that versions ``data/`` with DVC has to fix them first, and this says which. Nothing
here opens a file for reading or writes anything.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

# Each entry's problem, in the words of the manifest's quarantine reasons (and a loop).
from graft.data.layout import (
    BROKEN_SYMLINK,
    NOT_A_REGULAR_FILE,
    SYMLINK_OUTSIDE_DATA,
    dvc_cache_dirs,
    printable_name,
)

SYMLINK_LOOP = "symlink_loop"


@dataclass(frozen=True)
class Unversionable:
    """An entry under the data folder that DVC would fail on, hang on, or copy from outside.

    Attributes:
        relative: its path below the data folder, ``/``-separated (undecodable bytes escaped).
        problem: ``broken_symlink``, ``symlink_loop``, ``symlink_outside_data`` or
            ``not_a_regular_file`` (a FIFO, socket or device).
    """

    relative: str
    problem: str


def find_unversionable(data_dir: Path) -> list[Unversionable]:
    """Every entry below ``data_dir`` (hidden ones too: DVC versions them) that DVC cannot
    version as it is, sorted by path. Links into the data folder itself are fine."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return []
    # DVC's own links into its cache (cache.type symlink) are versioned data, not a problem.
    roots = tuple(Path(os.path.realpath(root)) for root in (data_dir, *dvc_cache_dirs(data_dir)))
    found: list[Unversionable] = []
    _scan(data_dir, data_dir, roots, found)
    return sorted(found, key=lambda entry: entry.relative)


def _scan(
    directory: Path, data_dir: Path, roots: tuple[Path, ...], found: list[Unversionable]
) -> None:
    with os.scandir(directory) as entries:
        listed = list(entries)
    for entry in listed:
        path = Path(entry.path)
        problem = _problem(path, roots)
        if problem:
            relative = printable_name(path.relative_to(data_dir).as_posix())
            found.append(Unversionable(relative, problem))
        elif entry.is_dir(follow_symlinks=False):
            _scan(path, data_dir, roots, found)


def _problem(path: Path, roots: tuple[Path, ...]) -> str:
    try:
        info = path.stat()  # follows links, as DVC does
    except OSError as exc:
        return SYMLINK_LOOP if exc.errno == errno.ELOOP else BROKEN_SYMLINK
    target = Path(os.path.realpath(path))
    if path.is_symlink() and not any(target.is_relative_to(root) for root in roots):
        return SYMLINK_OUTSIDE_DATA
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        return NOT_A_REGULAR_FILE
    return ""
