"""``graft predict``: classify image files and folders into a CSV or JSON table.

Each image is decoded by the training loader and preprocessed from the model's metadata, as the
server does, so the two give the same answers for the same file. A file that cannot be used
(not an image, truncated, ...) becomes a row with an ``error`` (the same reason codes as the
training manifest's quarantine), never the end of the run.

CSV columns: ``path, error, label, probability, label_1, probability_1, ... label_K,
probability_K``. JSON: a list of ``{"path": ..., "error": null | {"reason": ..., "detail": ...},
"label": ..., "probability": ..., "top_k": [{"label": ..., "probability": ...}, ...]}``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from graft.data.images import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS, ImageRejected
from graft.data.layout import BROKEN_SYMLINK, NOT_A_REGULAR_FILE
from graft.errors import InputError
from graft.files import NotARegularFile, open_regular_file, replacing
from graft.progress import progress
from graft.serving.limits import DEFAULT_MAX_PIXELS
from graft.serving.model import Prediction, ServedModel, decode

# Files a folder walk picks up; unsupported formats are listed too, so they show up as errors.
FOLDER_EXTENSIONS = IMAGE_EXTENSIONS | UNSUPPORTED_IMAGE_EXTENSIONS
OUTPUT_FORMATS = (".csv", ".json")


class PredictInputError(InputError):
    """A path given to ``graft predict`` does not exist, or the output format is unknown."""


@dataclass(frozen=True)
class PredictionRow:
    """One input file's result: a prediction, or why there is none."""

    path: str
    prediction: Prediction | None = None
    error: ImageRejected | None = None

    def as_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"path": self.path, "error": None}
        if self.error is not None:
            row["error"] = {"reason": self.error.reason, "detail": self.error.detail}
        if self.prediction is not None:
            row.update(self.prediction.as_dict())
        return row


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, and every image file under the folders named (recursively, sorted).

    A file named explicitly is always attempted, whatever its extension; in folders, entries
    with an image extension are (hidden ones are skipped), including broken links and FIFOs,
    so that each becomes a row with its error rather than vanishing from the table.

    Raises:
        PredictInputError: naming a path that does not exist.
    """
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            out.extend(sorted(_images_below(path)))
        elif path.exists() or path.is_symlink():
            out.append(path)
        else:
            raise PredictInputError(f"{path} does not exist: give image files or folders.")
    return out


def _images_below(folder: Path) -> Iterator[Path]:
    """Every non-folder entry with an image extension below ``folder``, following links to
    folders once each (a link back up the tree would never end)."""
    seen: set[str] = set()
    for directory, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in FOLDER_EXTENSIONS:
                yield Path(directory, name)


def predict_files(
    model: ServedModel,
    files: Sequence[Path],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    show_progress: bool = True,
) -> list[PredictionRow]:
    """Classify ``files`` in batches; a file that cannot be decoded gets a row with its error.

    Raises:
        graft.serving.model.NonFiniteOutputError: if the model itself is broken.
    """
    rows: list[PredictionRow] = []
    bar = progress(len(files), "predict") if show_progress else None
    try:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            arrays: list[np.ndarray] = []
            results: list[PredictionRow | int] = []
            for path in chunk:
                try:
                    arrays.append(model.preprocess(_decode_file(path, max_pixels)))
                    results.append(len(arrays) - 1)
                except ImageRejected as exc:
                    results.append(PredictionRow(str(path), error=exc))
            predictions = model.classify(np.stack(arrays), top_k) if arrays else []
            for path, result in zip(chunk, results, strict=True):
                if isinstance(result, int):
                    result = PredictionRow(str(path), prediction=predictions[result])
                rows.append(result)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return rows


def _decode_file(path: Path, max_pixels: int) -> Image.Image:
    """Decode one file as training does, only ever opening a regular file.

    Raises:
        ImageRejected: the loader's reasons, and ``broken_symlink``, ``not_a_regular_file``
            (a FIFO, socket or device: never read), ``permission_denied`` or ``unreadable``.
    """
    if path.suffix.lower() in UNSUPPORTED_IMAGE_EXTENSIONS:  # as validation does
        raise ImageRejected(
            "unsupported_format", f"{path.suffix} images are not supported: convert to PNG or JPEG"
        )
    try:
        with open_regular_file(path) as file:
            return decode(file, max_pixels)
    except NotARegularFile:
        raise ImageRejected(NOT_A_REGULAR_FILE, "a FIFO, socket or device: not read") from None
    except PermissionError as exc:
        raise ImageRejected("permission_denied", str(exc)) from None
    except OSError as exc:  # a link to nothing (or a loop of links), a file gone meanwhile
        if path.is_symlink() and not path.exists():
            raise ImageRejected(BROKEN_SYMLINK, f"the link leads to nothing: {exc}") from None
        raise ImageRejected("unreadable", str(exc)) from None


def output_format(output: Path | None) -> str:
    """``csv`` or ``json`` from the output's suffix (CSV on standard output when None).

    Raises:
        PredictInputError: for any other suffix.
    """
    if output is None:
        return "csv"
    if output.is_dir():
        raise PredictInputError(
            f"{output} is a folder: give the file to write, e.g. {output / 'predictions.csv'}."
        )
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise PredictInputError(
            f"{output}: the output must end in .csv or .json (the suffix picks the format)."
        )
    return suffix[1:]


def render(rows: Sequence[PredictionRow], fmt: str, top_k: int) -> str:
    """The rows as CSV or JSON text."""
    if fmt == "json":
        return json.dumps([row.as_dict() for row in rows], indent=2, allow_nan=False) + "\n"
    columns = ["path", "error", "label", "probability"]
    for rank in range(1, top_k + 1):
        columns += [f"label_{rank}", f"probability_{rank}"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells: list[Any] = [row.path, row.error.reason if row.error else ""]
        if row.prediction is None:
            cells += [""] * (len(columns) - 2)
        else:
            cells += [row.prediction.label, repr(row.prediction.probability)]
            for label, probability in row.prediction.top_k:
                cells += [label, repr(probability)]
            cells += [""] * (len(columns) - len(cells))
        writer.writerow(cells)
    return buffer.getvalue()


def encoded(text: str) -> bytes:
    """The table's bytes: UTF-8, and a file name that is not UTF-8 keeps its own bytes (the
    ``surrogateescape`` Python decoded it with), so each row names the file as the disk does."""
    return text.encode("utf-8", "surrogateescape")


def write_predictions(rows: Sequence[PredictionRow], output: Path, top_k: int) -> None:
    """Write the table to ``output`` (temporary file, then rename); the suffix picks the format."""
    with replacing(output) as temporary:
        temporary.write_bytes(encoded(render(rows, output_format(output), top_k)))
