"""Validate the raw image folder: decode every file, split, check the table, refuse bad data.

:func:`validate` returns the manifest, a summary and the data's drift profile, or raises
:class:`DataValidationError` naming the rule that failed, up to 20 offending files and what to
do. It only reads ``data/``. The policy: a bad file is quarantined (soft, the run goes on); a
rule of the data set failing (Great Expectations suite, empty split, drift with the gate on)
stops the run (hard).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from graft.config import DataParams
from graft.data.drift import compare_profiles, profile_manifest
from graft.data.expectations import ManifestSuite
from graft.data.layout import Layout, LayoutError, discover_images
from graft.data.manifest import DUPLICATE, MapImages, build_manifest, is_usable
from graft.data.splits import SPLITS
from graft.errors import InputError

MAX_LISTED_FILES = 20


class DataValidationError(InputError, ValueError):
    """The data folder cannot be trained on; the message names the rule and the fix."""


@dataclass(frozen=True)
class ValidationResult:
    """What :func:`validate` found.

    Attributes:
        manifest: one row per image file (see :mod:`graft.data.manifest`).
        summary: JSON-serialisable counts, quarantined files, layout, expectation results and
            drift against the baseline.
        profile: the drift profile of this data version (see :mod:`graft.data.drift`), the
            baseline of the next validation.
    """

    manifest: pd.DataFrame
    summary: dict[str, Any]
    profile: dict[str, Any]


def validate(
    data_dir: Path,
    params: DataParams,
    *,
    baseline: dict[str, Any] | None = None,
    data_docs_dir: Path | None = None,
    map_images: MapImages | None = None,
) -> ValidationResult:
    """Build the manifest of ``data_dir`` and refuse data that cannot be trained on.

    Bad files are quarantined and listed, not fatal, up to ``params.max_bad_fraction``.

    Args:
        data_dir: the raw image folder (``<class>/<image>`` or ``{train,val,test}/<class>/...``).
        params: the ``data`` section of ``params.yaml``.
        baseline: the profile of the previous validated data version, to measure drift
            against; None when there is none (drift is then reported as "no baseline").
        data_docs_dir: where to write Great Expectations' HTML Data Docs, if anywhere.
        map_images: where the files are checked (see :func:`graft.data.manifest.build_manifest`).

    Raises:
        DataValidationError: no images, fewer than 2 classes, a failed manifest expectation
            (too many bad files, a class under ``min_images_per_class`` or without training
            images, classes out of balance, the same image in two splits, ...), an empty
            split, or drift beyond the thresholds with ``drift_gate`` on.
    """
    data_dir = Path(data_dir)
    layout = _discover(data_dir)
    _refuse_no_images(data_dir, layout)
    building = functools.partial(
        ManifestSuite, labels=layout.classes, params=params, data_docs_dir=data_docs_dir
    )
    # The suite (seconds of imports and set-up, no file needed) is built on a thread while
    # the files are checked, which is most of the run: on 2 cores it costs half as much.
    suite: list[Future[ManifestSuite]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="graft-suite") as background:
        manifest = build_manifest(
            data_dir,
            params,
            layout=layout,
            map_images=map_images,
            once_started=lambda: suite.append(background.submit(building)),
        )
        _refuse_too_few_classes(data_dir, layout)
        expectations = (suite[0].result() if suite else building()).run(manifest)
    _refuse_failed_expectations(data_dir, expectations, data_docs_dir)
    _refuse_empty_splits(data_dir, layout, manifest, params)
    profile = profile_manifest(manifest)
    drift = compare_profiles(baseline, profile, params)
    _refuse_drift(data_dir, drift)
    summary = summarise(data_dir, layout, manifest, params, expectations)
    summary["drift"] = drift
    return ValidationResult(manifest=manifest, summary=summary, profile=profile)


def summarise(
    data_dir: Path,
    layout: Layout,
    manifest: pd.DataFrame,
    params: DataParams,
    expectations: dict[str, Any],
) -> dict[str, Any]:
    """Counts per class and split, every quarantined file, ignored files and the layout."""
    # Column by column: a frame of the usable rows would copy the manifest.
    ok = is_usable(manifest)
    quarantined = manifest.loc[~ok, ["path", "label", "reason"]]
    usable_splits = manifest.loc[ok, "split"].value_counts()
    ignored_reasons = Counter(file.why for file in layout.ignored)
    return {
        "data_dir": data_dir.as_posix(),
        "layout": {
            "kind": layout.kind,
            "split_folders": list(layout.split_folders),
            "val": _where_val_comes_from(layout),
        },
        "images": len(manifest),
        "ok": int(ok.sum()),
        "quarantined": len(quarantined),
        "bad": int((quarantined["reason"] != DUPLICATE).sum()),
        "duplicates": int((quarantined["reason"] == DUPLICATE).sum()),
        "classes": class_counts(manifest, layout.classes),
        "splits": {split: int(usable_splits.get(split, 0)) for split in SPLITS},
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
    ok = is_usable(manifest)
    usable = manifest.loc[ok, ["label", "split"]].value_counts()
    quarantined = manifest.loc[~ok, "label"].value_counts()
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


def _refuse_too_few_classes(data_dir: Path, layout: Layout) -> None:
    if len(layout.classes) >= 2:
        return
    found = ", ".join(repr(label) for label in layout.classes) or "none"
    raise DataValidationError(
        f"fewer than 2 classes: found {len(layout.classes)} class folder(s) in {data_dir}/ "
        f"({found}); a classifier needs at least 2. Put each class's images in its own folder, "
        f"{data_dir}/<class>/<image>."
    )


def _refuse_empty_splits(
    data_dir: Path, layout: Layout, manifest: pd.DataFrame, params: DataParams
) -> None:
    usable_splits = set(manifest.loc[is_usable(manifest), "split"].unique())
    # Few-shot: a class of 1-2 images may have none to spare for val; the head is then chosen
    # by leave-one-out (graft.fewshot), so only train and test must have images.
    val_expected = not params.few_shot and (
        "val" in layout.split_folders or params.val_fraction > 0
    )
    required = [split for split in SPLITS if split != "val" or val_expected]
    empty = [split for split in required if split not in usable_splits]
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


def _refuse_failed_expectations(
    data_dir: Path, expectations: dict[str, Any], data_docs_dir: Path | None
) -> None:
    if expectations["success"]:
        return
    lines = []
    fixes: list[str] = []
    for failure in expectations["failed"]:
        rule = failure["description"] or f"{failure['expectation']} on {failure['column']}"
        lines.append(f"- {rule}: {failure['details']}" + _listing(failure["files"], indent="    "))
        fix = (
            failure["fix"] or "Fix the files listed in the data folder and rerun `graft validate`."
        )
        if fix not in fixes:
            fixes.append(fix)
    docs = f"\nSee {data_docs_dir / 'index.html'} for the full report." if data_docs_dir else ""
    raise DataValidationError(
        f"manifest expectations failed for {data_dir}/ ({len(lines)} of "
        f"{expectations['evaluated']} failed):\n"
        + "\n".join(lines)
        + "\n"
        + "\n".join(fixes)
        + docs
    )


def _refuse_drift(data_dir: Path, drift: dict[str, Any]) -> None:
    if not (drift["gate"] and drift["exceeded"]):
        return
    raise DataValidationError(
        f"data drift in {data_dir}/ against the previous validated data version "
        f"({drift['previous_images']} images): " + "; ".join(drift["exceeded"]) + ". If the "
        "change is intended, validate once with data.drift_gate: false (this data then becomes "
        "the baseline) or raise the thresholds in params.yaml."
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
