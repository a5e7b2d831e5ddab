"""Finding the images under a data folder, in either of the two supported layouts.

``data/<class>/<image>`` (class folders; splits are assigned later by content hash) or
``data/{train,val,test}/<class>/<image>`` (split folders; ``val`` may be missing). Images may sit
deeper inside a class folder; the class is always the first folder below the data (or split)
folder. Hidden files and folders are skipped; other files are counted as ignored, never dropped
silently. Nothing here opens an image or writes anything.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft.data.images import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS
from graft.data.splits import SPLITS

SPLIT_FOLDERS = SPLITS  # data/{train,val,test}/<class>/: fixed splits
# Quarantine reasons known from the folder listing alone, before a file is opened.
BROKEN_SYMLINK = "broken_symlink"
SYMLINK_OUTSIDE_DATA = "symlink_outside_data"
NOT_A_REGULAR_FILE = "not_a_regular_file"
UNDECODABLE_NAME = "undecodable_name"
_KNOWN_EXTENSIONS = IMAGE_EXTENSIONS | UNSUPPORTED_IMAGE_EXTENSIONS
LayoutKind = Literal["class_folders", "split_folders"]


class LayoutError(ValueError):
    """The data folder mixes the two layouts, so classes and splits would be guessed."""


@dataclass(frozen=True, slots=True)
class ImageFile:
    """One image file found under the data folder.

    A million are held while validation checks the files, so each keeps only text, mostly
    shared: its folder is one string for all, and ``path`` is made when asked for (a ``Path``
    per file would take 300 bytes more).

    Attributes:
        folder: the data folder it was found under.
        relative: its path relative to the data folder, with ``/`` separators.
        label: its class folder's name.
        split: the split folder it sits in, or None in the class-folder layout.
        problem: a quarantine reason known without opening it (``symlink_outside_data``,
            ``broken_symlink``, ``not_a_regular_file`` (a FIFO, socket or device: never opened),
            ``undecodable_name`` (not UTF-8: ``relative`` and ``label`` show it escaped),
            ``unsupported_format`` for an image type graft cannot read,
            e.g. ``.heic``), or "".
        spelled: its path relative to the data folder as the file system spells it, where
            ``relative`` had to escape it (``undecodable_name``); otherwise "".
    """

    folder: str
    relative: str
    label: str
    split: str | None
    problem: str = ""
    spelled: str = ""

    @property
    def path(self) -> Path:
        """Where it was found (below the data folder, symlinks not resolved)."""
        return Path(self.folder, self.spelled or self.relative)


@dataclass(frozen=True)
class IgnoredFile:
    """A file that is not part of the data set, and why (``not_an_image_extension``,
    ``outside_class_folder`` or ``symlink_outside_data``)."""

    relative: str
    why: str


@dataclass(frozen=True)
class Layout:
    """What :func:`discover_images` found.

    Attributes:
        kind: ``class_folders`` or ``split_folders``.
        classes: every class folder's name, sorted, including folders without images.
        images: the image files, sorted by relative path.
        ignored: files that are not used, sorted by relative path.
        split_folders: the split folders present (split-folder layout only).
    """

    kind: LayoutKind
    classes: tuple[str, ...]
    images: tuple[ImageFile, ...]
    ignored: tuple[IgnoredFile, ...]
    split_folders: tuple[str, ...] = ()


def printable_name(name: str) -> str:
    """``name`` as UTF-8 text: bytes that are not UTF-8 (a file name from another system's
    encoding, held by Python as surrogates) become ``\\xNN`` escapes, so a name can be shown,
    written to the manifest and checked by Great Expectations. Other names are unchanged."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def discover_images(data_dir: Path, *, link_roots: Sequence[Path] | None = None) -> Layout:
    """List the image files under ``data_dir`` and detect which layout it uses.

    Args:
        data_dir: the data folder; a missing folder gives an empty class-folder layout.
        link_roots: folders besides ``data_dir`` that symlinks may point into; links elsewhere
            are quarantined. By default, the enclosing DVC project's ``.dvc/cache`` (DVC can
            check data out as symlinks into its cache).

    Raises:
        LayoutError: if split folders (train/val/test) sit beside class folders.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return Layout(kind="class_folders", classes=(), images=(), ignored=())
    top_folders = _visible_folders(data_dir)
    kind = _detect_kind(data_dir, top_folders)
    if link_roots is None:
        link_roots = dvc_cache_dirs(data_dir)
    roots = tuple(Path(os.path.realpath(root)) for root in (data_dir, *link_roots))
    images: list[ImageFile] = []
    ignored: list[IgnoredFile] = []
    label_depth = 1 if kind == "split_folders" else 0
    folder = str(data_dir)
    for path, posix, problem in _walk(data_dir, roots):
        relative = printable_name(posix)
        if relative != posix:
            problem = problem or UNDECODABLE_NAME  # later stages could not name it in the manifest
        parts = relative.split("/")
        suffix = path.suffix.lower()
        if len(parts) <= label_depth + 1:
            ignored.append(IgnoredFile(relative, problem or "outside_class_folder"))
        elif suffix not in _KNOWN_EXTENSIONS and not path.is_dir():
            ignored.append(IgnoredFile(relative, "not_an_image_extension"))
        else:
            if suffix in UNSUPPORTED_IMAGE_EXTENSIONS:
                problem = problem or "unsupported_format"
            # One string object per class and split, shared by their images.
            label = sys.intern(parts[label_depth])
            split = sys.intern(parts[0]) if kind == "split_folders" else None
            spelled = posix if relative != posix else ""
            images.append(ImageFile(folder, relative, label, split, problem, spelled))
    return Layout(
        kind=kind,
        classes=_class_names(data_dir, kind, top_folders),
        images=tuple(sorted(images, key=lambda image: image.relative)),
        ignored=tuple(sorted(ignored, key=lambda file: file.relative)),
        split_folders=tuple(name for name in SPLIT_FOLDERS if name in top_folders),
    )


def dvc_cache_dirs(data_dir: Path) -> list[Path]:
    """The enclosing DVC project's cache, which DVC may link the data's files into."""
    for folder in Path(data_dir).resolve().parents:
        if (folder / ".dvc").is_dir():
            return [folder / ".dvc" / "cache"]
    return []


def _detect_kind(data_dir: Path, top_folders: list[str]) -> LayoutKind:
    split_names = [name for name in top_folders if name in SPLIT_FOLDERS]
    if not split_names:
        return "class_folders"
    others = [name for name in top_folders if name not in SPLIT_FOLDERS]
    if others:
        raise LayoutError(
            f"{data_dir} mixes split folders ({', '.join(split_names)}) with class folders "
            f"({', '.join(others[:10])}). Use either {data_dir}/<class>/<image> or "
            f"{data_dir}/{{train,val,test}}/<class>/<image>, not both."
        )
    return "split_folders"


def _class_names(data_dir: Path, kind: LayoutKind, top_folders: list[str]) -> tuple[str, ...]:
    if kind == "class_folders":
        return tuple(sorted(printable_name(name) for name in top_folders))
    names = {name for split in top_folders for name in _visible_folders(data_dir / split)}
    return tuple(sorted(printable_name(name) for name in names))


def _visible_folders(directory: Path) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(
            entry.name for entry in entries if not entry.name.startswith(".") and entry.is_dir()
        )


def _walk(directory: Path, roots: tuple[Path, ...]) -> Iterator[tuple[Path, str, str]]:
    """Yield ``(path, relative, problem)`` for each visible file below ``directory`` (``relative``
    to it, ``/``-separated), following links that stay inside ``roots`` and reporting the
    others instead of reading them."""
    yield from _walk_below(directory, "", roots, ancestors=(Path(os.path.realpath(directory)),))


def _walk_below(
    directory: Path, prefix: str, roots: tuple[Path, ...], ancestors: tuple[Path, ...]
) -> Iterator[tuple[Path, str, str]]:
    with os.scandir(directory) as scan:
        entries = sorted((entry for entry in scan if not entry.name.startswith(".")), key=_name)
    for entry in entries:
        path = Path(entry.path)
        relative = prefix + entry.name  # built as the walk goes: a million files, no relative_to
        if entry.is_symlink():
            target = Path(os.path.realpath(path))
            if not any(target.is_relative_to(root) for root in roots):
                yield path, relative, SYMLINK_OUTSIDE_DATA
                continue
            if not target.exists():
                yield path, relative, BROKEN_SYMLINK  # a loop of links, too: it leads to nothing
                continue
        if entry.is_dir():
            real = Path(os.path.realpath(path))
            if real not in ancestors:  # a link back up the tree would never end
                yield from _walk_below(path, relative + "/", roots, (*ancestors, real))
        elif entry.is_file():
            yield path, relative, ""
        else:  # a FIFO would block the reader forever; a socket or device is no image either
            yield path, relative, NOT_A_REGULAR_FILE


def _name(entry: os.DirEntry) -> str:
    return entry.name
