"""Validate the raw image folder: decode every file, split, check the table, refuse bad data.

:func:`validate` returns the manifest and a summary, or raises :class:`DataValidationError`
naming the rule that failed, the data folder and what to do. It only reads ``data/``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from graft.config import DataParams
from graft.data.expectations import run_manifest_expectations
from graft.data.layout import Layout, LayoutError, discover_images
from graft.data.manifest import DUPLICATE, build_manifest
from graft.data.splits import SPLITS
from graft.errors import GraftError

MAX_LISTED_FILES = 20


class DataValidationError(GraftError, ValueError):
    """The data folder cannot be trained on; the message names the rule and the fix."""


@dataclass(frozen=True)
class ValidationResult:
    """What :func:`validate` found.

    Attributes:
        manifest: one row per image file (see :mod:`graft.data.manifest`).
        summary: JSON-serialisable counts, quarantined files, layout and expectation results.
    """

    manifest: pd.DataFrame
    summary: dict[str, Any]


def validate(data_dir: Path, params: DataParams) -> ValidationResult:
    """Build the manifest of ``data_dir`` and refuse data that cannot be trained on.

    Bad files are quarantined and listed, not fatal, up to ``params.max_bad_fraction``.

    Args:
        data_dir: the raw image folder (``<class>/<image>`` or ``{train,val,test}/<class>/...``).
        params: the ``data`` section of ``params.yaml``.

    Raises:
        DataValidationError: no images, fewer than 2 classes, a class under
            ``min_images_per_class`` or without training images, too many bad files, an empty
            split, or a failed manifest expectation (e.g. the same image in two splits).
    """
    data_dir = Path(data_dir)
    layout = _discover(data_dir)
    _refuse_no_images(data_dir, layout)
    manifest = build_manifest(data_dir, params, layout=layout)
    _refuse_too_many_bad_files(data_dir, manifest, params)
    _refuse_too_few_classes(data_dir, layout)
    _refuse_small_classes(data_dir, class_counts(manifest, layout.classes), params)
    _refuse_empty_splits(data_dir, layout, manifest, params)
    expectations = run_manifest_expectations(
        manifest, labels=layout.classes, min_size=params.min_size
    )
    _refuse_failed_expectations(data_dir, expectations)
    summary = summarise(data_dir, layout, manifest, params, expectations)
    return ValidationResult(manifest=manifest, summary=summary)


def summarise(
    data_dir: Path,
    layout: Layout,
    manifest: pd.DataFrame,
    params: DataParams,
    expectations: dict[str, Any],
) -> dict[str, Any]:
    """Counts per class and split, every quarantined file, ignored files and the layout."""
    ok = manifest[manifest["status"] == "ok"]
    quarantined = manifest[manifest["status"] != "ok"]
    ignored_reasons = Counter(file.why for file in layout.ignored)
    return {
        "data_dir": data_dir.as_posix(),
        "layout": {
            "kind": layout.kind,
            "split_folders": list(layout.split_folders),
            "val": _where_val_comes_from(layout),
        },
        "images": len(manifest),
        "ok": len(ok),
        "quarantined": len(quarantined),
        "bad": int((quarantined["reason"] != DUPLICATE).sum()),
        "duplicates": int((quarantined["reason"] == DUPLICATE).sum()),
        "classes": class_counts(manifest, layout.classes),
        "splits": {split: int((ok["split"] == split).sum()) for split in SPLITS},
        "quarantined_files": [
            {"path": row.path, "label": row.label, "reason": row.reason}
            for row in quarantined.itertuples()
        ],
        "ignored_files": {
            "count": len(layout.ignored),
            "by_reason": dict(sorted(ignored_reasons.items())),
            "examples": [file.relative for file in layout.ignored[:MAX_LISTED_FILES]],
        },
        "expectations": expectations,
        "params": params.model_dump(),
    }


def _discover(data_dir: Path) -> Layout:
    try:
        return discover_images(data_dir)
    except LayoutError as exc:
        raise DataValidationError(f"ambiguous layout: {exc}") from None


def _where_val_comes_from(layout: Layout) -> str:
    if layout.kind == "class_folders":
        return "assigned by content hash"
    if "val" in layout.split_folders:
        return "val folder"
    return "carved out of train by content hash"


def class_counts(manifest: pd.DataFrame, classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per class: usable (``ok``) and ``quarantined`` files, and usable files per split."""
    ok = manifest["status"] == "ok"
    usable = manifest[ok].groupby("label")["split"].value_counts()
    quarantined = manifest[~ok]["label"].value_counts()
    counts = {}
    for label in classes:
        per_split = {split: int(usable.get((label, split), 0)) for split in SPLITS}
        counts[label] = {
            "ok": sum(per_split.values()),
            "quarantined": int(quarantined.get(label, 0)),
            **per_split,
        }
    return counts


def _refuse_no_images(data_dir: Path, layout: Layout) -> None:
    if layout.images:
        return
    where = f"{data_dir}/" if data_dir.is_dir() else f"{data_dir}/ (the folder does not exist)"
    found = f" ({len(layout.ignored)} other files ignored)" if layout.ignored else ""
    raise DataValidationError(
        f"no images found in {where}{found} — add {data_dir}/<class>/<image> folders "
        f"(or {data_dir}/{{train,val,test}}/<class>/<image>), or run `graft sample-data`."
    )


def _refuse_too_many_bad_files(data_dir: Path, manifest: pd.DataFrame, params: DataParams) -> None:
    bad = manifest[(manifest["status"] != "ok") & (manifest["reason"] != DUPLICATE)]
    fraction = len(bad) / len(manifest)
    if fraction <= params.max_bad_fraction:
        return
    raise DataValidationError(
        f"too many bad files: {len(bad)} of {len(manifest)} images in {data_dir}/ "
        f"({fraction:.1%}) cannot be used, above data.max_bad_fraction = "
        f"{params.max_bad_fraction}. Replace or remove them in {data_dir}/ (graft never edits "
        "your data), or raise data.max_bad_fraction in params.yaml."
        + _listing(f"{row.path} ({row.reason})" for row in bad.itertuples())
    )


def _refuse_too_few_classes(data_dir: Path, layout: Layout) -> None:
    if len(layout.classes) >= 2:
        return
    found = ", ".join(repr(label) for label in layout.classes) or "none"
    raise DataValidationError(
        f"fewer than 2 classes: found {len(layout.classes)} class folder(s) in {data_dir}/ "
        f"({found}); a classifier needs at least 2. Put each class's images in its own folder, "
        f"{data_dir}/<class>/<image>."
    )


def _refuse_small_classes(
    data_dir: Path, counts_per_class: dict[str, dict[str, int]], params: DataParams
) -> None:
    problems = []
    for label, counts in counts_per_class.items():
        if counts["ok"] < params.min_images_per_class:
            also = f" (and {counts['quarantined']} quarantined)" if counts["quarantined"] else ""
            problems.append(
                f"class {label!r} has {counts['ok']} usable images{also}, under the minimum of "
                f"{params.min_images_per_class}"
            )
        elif counts["train"] == 0:
            problems.append(f"class {label!r} has no images in the train split")
    if problems:
        raise DataValidationError(
            f"class under the minimum in {data_dir}/: "
            + "; ".join(problems)
            + ". Add images to those class folders, remove the folders, or lower "
            "data.min_images_per_class in params.yaml."
        )


def _refuse_empty_splits(
    data_dir: Path, layout: Layout, manifest: pd.DataFrame, params: DataParams
) -> None:
    ok = manifest[manifest["status"] == "ok"]
    val_expected = "val" in layout.split_folders or params.val_fraction > 0
    required = [split for split in SPLITS if split != "val" or val_expected]
    empty = [split for split in required if not (ok["split"] == split).any()]
    if not empty:
        return
    if layout.kind == "split_folders":
        fix = " and ".join(f"{data_dir}/{split}/<class>/<image>" for split in empty)
        fix = f"add images as {fix}"
    else:
        fix = "add images, or raise data.val_fraction / data.test_fraction in params.yaml"
    raise DataValidationError(
        f"empty split: {', '.join(empty)} has no usable images in {data_dir}/; {fix}."
    )


def _refuse_failed_expectations(data_dir: Path, expectations: dict[str, Any]) -> None:
    if expectations["success"]:
        return
    lines = []
    for failure in expectations["failed"]:
        rule = failure["description"] or f"{failure['expectation']} on {failure['column']}"
        lines.append(f"- {rule}: {failure['details']}" + _listing(failure["files"], indent="    "))
    leakage = any("leakage" in failure["description"] for failure in expectations["failed"])
    fix = (
        "Each image may be in one split only: remove the copies from all but one split folder."
        if leakage
        else "Fix the files listed in the data folder and rerun `graft validate`."
    )
    raise DataValidationError(
        f"manifest expectations failed for {data_dir}/ ({len(lines)} of "
        f"{expectations['evaluated']} failed):\n" + "\n".join(lines) + f"\n{fix}"
    )


def _listing(items: Any, indent: str = "  ") -> str:
    items = list(items)
    shown = "".join(f"\n{indent}{item}" for item in items[:MAX_LISTED_FILES])
    more = (
        f"\n{indent}... and {len(items) - MAX_LISTED_FILES} more"
        if len(items) > MAX_LISTED_FILES
        else ""
    )
    return shown + more
