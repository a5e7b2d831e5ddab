"""The manifest: one row per image file found under ``data/``, the contract between stages.

Columns: ``path`` (relative to the data folder, ``/``-separated), ``label``, ``split``,
``sha256`` and ``bytes`` of the file, ``format``, ``mode``, ``width`` and ``height`` as decoded,
``brightness`` (mean grey level 0-255, for drift checks), ``status`` (``ok`` or ``quarantined``)
and ``reason`` (why it was quarantined, "" when ok).
Every image is fully decoded once here; a file that fails is kept as a quarantined row, so the
run goes on and the report can list it. Nothing under the data folder is ever written.
"""

from __future__ import annotations

import functools
import hashlib
import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ImageStat

from graft.config import DataParams
from graft.data.images import ImageRejected, decode_image
from graft.data.layout import NOT_A_REGULAR_FILE, ImageFile, Layout, discover_images
from graft.data.splits import assign_split, split_position
from graft.errors import InputError
from graft.files import NotARegularFile, open_regular_file, replacing
from graft.progress import progress

MANIFEST_COLUMNS = (
    "path",
    "label",
    "split",
    "sha256",
    "bytes",
    "format",
    "mode",
    "width",
    "height",
    "brightness",
    "status",
    "reason",
)
INTEGER_COLUMNS = ("bytes", "width", "height")
FLOAT_COLUMNS = ("brightness",)
_UNIQUE_TEXT_COLUMNS = ("path", "sha256")
DUPLICATE = "duplicate"
TOO_LARGE = "too_large"  # over data.max_file_bytes: quarantined without being read
# Decoding holds whole images in memory, so a few threads are plenty (Pillow releases the GIL).
_MAX_DECODE_THREADS = 8


# Maps the check of one file over the files, results in their order (graft.parallel has ones
# over a process pool and a Dask cluster; the default is a thread pool here).
MapImages = Callable[[Callable[[ImageFile], dict], Sequence[ImageFile]], Iterable[dict]]


class ManifestError(InputError, ValueError):
    """A manifest file that is missing columns graft needs."""


def is_usable(manifest: pd.DataFrame) -> pd.Series:
    """Which rows every later stage uses: decoded and validated (status ``ok``)."""
    return manifest["status"] == "ok"


def usable_rows(manifest: pd.DataFrame, splits: str | Iterable[str] | None = None) -> pd.DataFrame:
    """The usable rows, of ``splits`` only when given (a split name or several)."""
    keep = is_usable(manifest)
    if splits is not None:
        keep &= manifest["split"].isin([splits] if isinstance(splits, str) else list(splits))
    return manifest[keep]


def usable_labels(manifest: pd.DataFrame) -> list[str]:
    """The classes with a usable image, sorted: the label order of every model."""
    return sorted(usable_rows(manifest)["label"].unique())


def build_manifest(
    data_dir: Path,
    params: DataParams,
    *,
    layout: Layout | None = None,
    map_images: MapImages | None = None,
    once_started: Callable[[], object] | None = None,
) -> pd.DataFrame:
    """Decode every image under ``data_dir`` and describe it in one manifest row.

    A file that cannot be used is quarantined with its reason (``empty``, ``not_an_image``,
    ``unsupported_format``, ``truncated``, ``too_small``, ``too_many_pixels``,
    ``extreme_aspect_ratio``, ``unreadable``,
    ``symlink_outside_data``, ``broken_symlink``, ``not_a_regular_file``, ``too_large``,
    ``undecodable_name``). Only
    regular files are opened, and each is streamed (hashed in chunks, decoded by Pillow as it
    reads), never read whole; one over ``data.max_file_bytes`` is not read at all. A
    byte-identical copy of an earlier image with the same label in the same split is
    quarantined as ``duplicate``.

    Args:
        data_dir: the data folder, in either layout of :mod:`graft.data.layout`.
        params: the ``data`` section of ``params.yaml``.
        layout: the result of :func:`~graft.data.layout.discover_images` if already known.
        map_images: maps the check of one file over the files, in order (graft.parallel: a
            process per core, or a Dask cluster); None: threads in this process.
        once_started: called once the first file is checked, while the others are: work to
            overlap with the checks. A process pool's workers are all forked by then, so it
            may start threads.

    Returns:
        The manifest, sorted by path, with exactly the columns in ``MANIFEST_COLUMNS``.
    """
    if layout is None:
        layout = discover_images(data_dir)
    images = layout.images
    has_val_folder = "val" in layout.split_folders
    columns = _Columns()
    with _mapper(map_images, len(images)) as mapper:
        described = mapper(functools.partial(_describe, params=params), images)
        with progress(len(images), "checking images") as bar:
            for count, (image, row) in enumerate(zip(images, described, strict=True), 1):
                row["split"] = _split_of(image, row["sha256"], params, has_val_folder)
                # The layout's strings, not the copies a worker process sent back.
                row["path"], row["label"] = image.relative, image.label
                columns.append(row)
                bar.update()
                if once_started is not None and count == 1:
                    once_started()
    manifest = _quarantine_duplicates(columns.frame())
    if params.few_shot:
        hashed = [image.split is None or image.split == "train" for image in images]
        movable = pd.Series(hashed, index=[image.relative for image in images])
        manifest = give_every_class_a_train_image(manifest, params.seed, movable)
    return manifest


@contextmanager
def _mapper(map_images: MapImages | None, count: int) -> Iterator[MapImages]:
    if map_images is not None:
        yield map_images
        return
    workers = max(1, min(_MAX_DECODE_THREADS, os.cpu_count() or 1, count))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield pool.map


def _describe(image: ImageFile, params: DataParams) -> dict:
    row: dict = {
        "path": image.relative,
        "label": image.label,
        "sha256": "",
        "bytes": pd.NA,
        "format": "",
        "mode": "",
        "width": pd.NA,
        "height": pd.NA,
        "brightness": pd.NA,
        "status": "quarantined",
        "reason": image.problem,
    }
    if image.problem:
        return row  # never read through a link that leaves the data folder, nor a FIFO
    try:
        with open_regular_file(image.path) as file:
            size = os.fstat(file.fileno()).st_size
            if size > params.max_file_bytes:
                return {**row, "bytes": size, "reason": TOO_LARGE}
            row.update(sha256=hashlib.file_digest(file, "sha256").hexdigest(), bytes=size)
            file.seek(0)
            decoded = decode_image(file, min_size=params.min_size, max_pixels=params.max_pixels)
    except NotARegularFile:
        return {**row, "reason": NOT_A_REGULAR_FILE}
    except ImageRejected as rejected:
        return {**row, "reason": rejected.reason}
    except OSError:
        return {**row, "reason": "unreadable"}
    width, height = decoded.image.size
    return {
        **row,
        "format": decoded.format,
        "mode": decoded.mode,
        "width": width,
        "height": height,
        "brightness": round(ImageStat.Stat(decoded.image.convert("L")).mean[0], 2),
        "status": "ok",
    }


def _split_of(image: ImageFile, sha256: str, params: DataParams, has_val_folder: bool) -> str:
    # An unreadable file has no content hash; its path stands in (it is never used anyway).
    key = sha256 or hashlib.sha256(image.relative.encode()).hexdigest()
    if image.split is None:
        return assign_split(key, params.seed, params.val_fraction, params.test_fraction)
    if image.split == "train" and not has_val_folder:
        return assign_split(key, params.seed, params.val_fraction, 0.0)
    return image.split


def give_every_class_a_train_image(
    manifest: pd.DataFrame, seed: int, movable: pd.Series
) -> pd.DataFrame:
    """Few-shot split rule: a class whose images all hashed into val/test gets one back.

    Of such a class's usable images whose split came from the hash (not a fixed split folder),
    the one whose hash position lies nearest the train range moves to train. Other classes
    keep the plain hash split, so adding images still moves nothing unless it is what gives a
    class its first train image.
    """
    ok = usable_rows(manifest)
    has_train = set(ok.loc[ok["split"] == "train", "label"])
    for label, rows in ok.groupby("label", sort=True):
        if label in has_train:
            continue
        rows = rows[rows["path"].map(movable).fillna(False).astype(bool)]
        if rows.empty:
            continue  # fixed split folders: the expectation names the class
        positions = rows["sha256"].map(lambda sha: split_position(sha, seed))
        manifest.loc[positions.idxmax(), "split"] = "train"
    return manifest


def _quarantine_duplicates(manifest: pd.DataFrame) -> pd.DataFrame:
    ok = is_usable(manifest)
    repeated = manifest.loc[ok, ["sha256", "split", "label"]].duplicated(keep="first")
    later_copies = repeated[repeated].index
    manifest.loc[later_copies, "status"] = "quarantined"
    manifest.loc[later_copies, "reason"] = DUPLICATE
    return manifest


class _Columns:
    """The manifest's columns, filled row by row as the checks come back, each value kept as
    the frame will hold it: a number as 8 bytes and a flag when missing (not a Python object),
    a text of few distinct values (split, format, mode, status, reason) as a reference to one
    shared string, and path and label as the layout's own strings. The frame is then made of
    these arrays, not of a copy of them."""

    def __init__(self) -> None:
        self._texts: dict[str, list] = {
            column: []
            for column in MANIFEST_COLUMNS
            if column not in INTEGER_COLUMNS + FLOAT_COLUMNS
        }
        self._numbers = {
            **{column: array("q") for column in INTEGER_COLUMNS},
            **{column: array("d") for column in FLOAT_COLUMNS},
        }
        self._missing = {column: bytearray() for column in self._numbers}
        self._shared: dict[str, str] = {}

    def append(self, row: dict) -> None:
        for column, values in self._texts.items():
            value = row[column]
            if column not in _UNIQUE_TEXT_COLUMNS:
                value = self._shared.setdefault(value, value)
            values.append(value)
        for column, numbers in self._numbers.items():
            value = row[column]
            missing = value is pd.NA or value is None
            numbers.append(0 if missing else value)
            self._missing[column].append(missing)

    def frame(self) -> pd.DataFrame:
        """The manifest of the rows appended, sorted by path; the columns are emptied."""
        data = {}
        for column in MANIFEST_COLUMNS:
            if column in self._numbers:
                numbers = np.array(self._numbers.pop(column))
                missing = np.array(self._missing.pop(column), dtype=bool)
                masked = (
                    pd.arrays.FloatingArray if column in FLOAT_COLUMNS else pd.arrays.IntegerArray
                )
                data[column] = masked(numbers, missing)
            else:
                texts = np.array(self._texts.pop(column), dtype=object)
                data[column] = pd.Series(texts, dtype=object, copy=False)  # str, never inferred
        frame = pd.DataFrame(data, copy=False)
        if not frame["path"].is_monotonic_increasing:  # the layout lists files sorted already
            frame = frame.sort_values("path", kind="stable", ignore_index=True)
        return frame


def _with_column_types(frame: pd.DataFrame) -> pd.DataFrame:
    for column in MANIFEST_COLUMNS:
        if column in INTEGER_COLUMNS:
            frame[column] = pd.to_numeric(frame[column].replace("", pd.NA)).astype("Int64")
        elif column in FLOAT_COLUMNS:
            frame[column] = pd.to_numeric(frame[column].replace("", pd.NA)).astype("Float64")
        else:
            frame[column] = frame[column].astype(object)
    return frame


def write_manifest(manifest: pd.DataFrame, path: Path) -> None:
    """Write the manifest as CSV, atomically (a reader never sees half a file), straight to the
    file: no copy of the whole text in memory."""
    with replacing(Path(path)) as temporary:
        manifest.to_csv(
            temporary,
            columns=list(MANIFEST_COLUMNS),
            index=False,
            lineterminator="\n",
            encoding="utf-8",
        )


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`.

    Every text column stays a string (a class named ``0`` or ``NA`` stays ``"0"`` or ``"NA"``);
    ``bytes``, ``width`` and ``height`` are nullable integers, ``brightness`` a nullable float.

    Raises:
        ManifestError: if the file is missing or lacks manifest columns.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
    except FileNotFoundError:
        raise ManifestError(f"{path} not found: run `graft validate` first.") from None
    missing = [column for column in MANIFEST_COLUMNS if column not in frame.columns]
    if missing:
        raise ManifestError(
            f"{path} is not a graft manifest (missing columns: {', '.join(missing)}); "
            "rerun `graft validate` to rebuild it."
        )
    return _with_column_types(frame[list(MANIFEST_COLUMNS)].copy())
