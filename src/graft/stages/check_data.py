"""``graft check-data``: is ``data/`` the version ``data.dvc`` records, and can DVC version it?

Run by the training flow before ``dvc pull`` (which would otherwise check the recorded version
out over the user's images: a relabelled image moved back, new images refused) and by
``make repro`` before ``dvc repro``. Nothing under ``data/`` is ever written: a change is either
refused, naming it and the command that records it, or recorded with
``dvc add --no-relink data``, which leaves every file and link as it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from graft.data.tracking import find_unversionable
from graft.errors import GraftError, InputError
from graft.paths import ProjectPaths

MAX_LISTED = 20


class DataNotRecorded(InputError):
    """``data/`` differs from ``data.dvc``, or holds entries DVC cannot version."""


@dataclass(frozen=True)
class DataChanges:
    """How ``data/`` differs from the version ``data.dvc`` records (paths below the project)."""

    added: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    modified: tuple[str, ...] = ()
    renamed: tuple[tuple[str, str], ...] = ()
    unlisted: bool = False  # differs, but the recorded listing is not in the DVC cache

    def __bool__(self) -> bool:
        return bool(self.added or self.deleted or self.modified or self.renamed or self.unlisted)

    def describe(self) -> str:
        lines = [f"  added: {path}" for path in self.added]
        lines += [f"  deleted: {path}" for path in self.deleted]
        lines += [f"  modified: {path}" for path in self.modified]
        lines += [f"  moved: {old} -> {new}" for old, new in self.renamed]
        if len(lines) > MAX_LISTED:
            lines = [*lines[:MAX_LISTED], f"  ... and {len(lines) - MAX_LISTED} more"]
        if self.unlisted:
            lines.append("  (which files: the recorded version is not in the DVC cache)")
        return "\n".join(lines)


def main(root: Path = Path("."), *, record: bool = False) -> str:
    """Check ``root/data`` against ``root/data.dvc`` before any DVC command may write there.

    Returns:
        What was found: ``untracked`` (no data.dvc, and not ``record``), ``absent`` (no data
        yet: ``dvc pull`` brings the recorded version), ``unchanged``, or ``recorded`` (changed
        or untracked, and ``record``).

    Raises:
        DataNotRecorded: an entry DVC would fail on, hang on or copy from outside ``data/``;
            or ``data/`` changed and ``record`` is false.
    """
    paths = ProjectPaths(Path(root))
    unversionable = find_unversionable(paths.data)
    if unversionable:
        listed = "\n".join(f"  {entry.relative}: {entry.problem}" for entry in unversionable)
        raise DataNotRecorded(
            f"{paths.data} holds entries DVC cannot version (it would fail, wait forever, or "
            f"copy a file from outside {paths.data} into its cache):\n{listed}\n"
            f"Remove or fix them (copy a linked file into {paths.data} instead); "
            "nothing was run."
        )
    has_data = paths.data.is_dir() and any(paths.data.iterdir())
    if not paths.data_dvc.is_file():
        if record and has_data and (paths.root / ".dvc").is_dir():
            _dvc(paths.root, "add", "--quiet", "--no-relink", "data")
            return "recorded"
        return "untracked"
    if not has_data:
        return "absent"
    changes = recorded_changes(paths.root)
    if not changes:
        return "unchanged"
    if not record:
        raise DataNotRecorded(
            f"{paths.data} differs from the version {paths.data_dvc} records:\n"
            f"{changes.describe()}\n"
            "Nothing was pulled or run, and nothing under data/ was touched. To train on data/ "
            "as it is, record it: `graft check-data --record` (`dvc add --no-relink data`: "
            "no file is touched; then commit data.dvc), or set flow.record_data: true in "
            "params.yaml. To go back to the recorded version "
            "instead (this discards the changes above): `dvc pull --force data.dvc`."
        )
    _dvc(paths.root, "add", "--quiet", "--no-relink", "data")
    return "recorded"


def recorded_changes(root: Path) -> DataChanges:
    """``dvc data status --granular``: ``data/`` against ``data.dvc``, file by file."""
    status = json.loads(_dvc(root, "data", "status", "--granular", "--json"))
    uncommitted = status.get("uncommitted", {})

    def files(kind: str) -> tuple[str, ...]:
        return tuple(
            path for path in uncommitted.get(kind, []) if _in_data(path) and path != "data/"
        )

    renamed = tuple(
        (move["old"], move["new"])
        for move in uncommitted.get("renamed", [])
        if _in_data(move["new"]) or _in_data(move["old"])
    )
    changes = DataChanges(files("added"), files("deleted"), files("modified"), renamed)
    if changes or not any(_in_data(path) for path in uncommitted.get("modified", [])):
        return changes
    return DataChanges(unlisted=True)


def _in_data(path: str) -> bool:
    return path == "data" or path.startswith("data/")


def _dvc(root: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise GraftError(
            f"`dvc {' '.join(args)}` failed in {root} (exit {result.returncode}):\n"
            f"{(result.stdout + result.stderr).strip()[-2000:]}"
        )
    return result.stdout
