"""Great Expectations suite over the manifest: the table-level contract later stages rely on.

Pillow checks each file's bytes (see :mod:`graft.data.images`); this suite checks the table:
required columns, allowed values, sizes, labels, that no image content is shared between
splits (leakage), and the data-set rules of ``params.yaml``: the fraction of bad files, usable
images per class and the balance between classes. It is the one place those rules live. Rules
about a whole class are checked on per-row columns derived from the manifest (e.g. each row
carries its class's count of usable images), so a failure lists the files concerned. Great
Expectations is imported only when the suite runs, since importing it takes seconds.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from graft.config import DataParams
from graft.data.manifest import DUPLICATE, MANIFEST_COLUMNS
from graft.data.splits import SPLITS

# Per ok row: in how many splits its content appears. More than one is leakage.
SPLITS_SHARING_CONTENT = "splits_sharing_content"
# Per ok row: usable images of its class, of its class in train, and how many times larger the
# largest class is than its class.
CLASS_IMAGES = "class_usable_images"
CLASS_TRAIN_IMAGES = "class_train_images"
CLASS_IMBALANCE = "largest_class_over_this_class"
PIXELS = "pixels"
_NOT_NULL_COLUMNS = ("path", "label", "split", "sha256", "status")
_MAX_LISTED_FILES = 20
# `mostly` compares fractions of counts; a hair of slack keeps the exact boundary passing.
_FRACTION_SLACK = 1e-9


def run_manifest_expectations(
    manifest: pd.DataFrame,
    *,
    labels: Sequence[str],
    params: DataParams,
    data_docs_dir: Path | None = None,
) -> dict[str, Any]:
    """Validate the manifest with a Great Expectations suite in an ephemeral context.

    Args:
        manifest: the table built by :func:`graft.data.manifest.build_manifest`.
        labels: the class folders discovered under the data folder.
        params: the ``data`` section of ``params.yaml`` (sizes and data-set rules).
        data_docs_dir: if given, the folder is replaced by Great Expectations' HTML Data Docs
            of this validation (``index.html``).

    Returns:
        A JSON-serialisable summary: ``success``, ``evaluated``, ``successful`` and ``failed``,
        a list of ``{expectation, column, description, details, fix, files, classes}`` where
        ``files`` holds up to 20 offending paths and ``classes`` the offending classes with
        their value of a per-class column.
    """
    suite = ManifestSuite(labels=labels, params=params, data_docs_dir=data_docs_dir)
    return suite.run(manifest)


class ManifestSuite:
    """The suite in its ephemeral context, built before the manifest exists.

    Importing Great Expectations and building the context, the suite and its checkpoint take
    seconds and need only the classes and the params, so validation builds this while the
    files are being checked (:func:`graft.validate.validate`) and then :meth:`run` s it on the
    manifest. Building it replaces ``data_docs_dir``.
    """

    def __init__(
        self, *, labels: Sequence[str], params: DataParams, data_docs_dir: Path | None = None
    ) -> None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        actions = []
        if data_docs_dir is not None:
            data_docs_dir = Path(data_docs_dir).resolve()
            shutil.rmtree(data_docs_dir, ignore_errors=True)  # only this run's pages, no history
            context.add_data_docs_site(
                site_name="graft",
                site_config={
                    "class_name": "SiteBuilder",
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        "base_directory": str(data_docs_dir),
                    },
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            )
            actions.append(
                gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["graft"])
            )
        self._datasource = context.data_sources.add_pandas("graft")
        asset = self._datasource.add_dataframe_asset("manifest")
        batch_definition = asset.add_batch_definition_whole_dataframe("manifest")
        # Added whole: the context stores the suite once, not once per expectation.
        suite = context.suites.add(
            gx.ExpectationSuite(
                name="graft_manifest",
                expectations=_manifest_suite(gx, labels=labels, params=params),
            )
        )
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name="manifest", data=batch_definition, suite=suite)
        )
        self._checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name="graft_validate",
                validation_definitions=[definition],
                actions=actions,
                result_format={
                    "result_format": "COMPLETE",
                    "unexpected_index_column_names": ["path", "label"],
                },
            )
        )

    def run(self, manifest: pd.DataFrame) -> dict[str, Any]:
        """The suite's verdict on ``manifest``, as :func:`run_manifest_expectations` returns it."""
        try:
            outcome = self._checkpoint.run(
                batch_parameters={"dataframe": with_derived_columns(manifest)}
            )
        finally:
            _forget_batch(self._datasource.get_execution_engine())
        (result,) = outcome.run_results.values()
        return _summarise(result)


def _forget_batch(engine: Any) -> None:
    """Drop the frame and the metrics computed on it (most a value per row and rule) that the
    data source's engine keeps until its next batch: Great Expectations holds the context
    globally, so they would stay in memory while the summary and the profile are computed."""
    engine.batch_manager.reset_batch_cache()
    engine.batch_manager.batch_data_cache.clear()
    # No public way (an empty cache is the engine's start state); a version without it: skipped.
    metrics = getattr(engine, "_metric_cache", None)
    if metrics is not None:
        metrics.clear()


def with_derived_columns(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest plus the per-row columns the data-set rules are checked on."""
    frame = manifest.copy(deep=False)
    if not {"sha256", "split", "status", "label"} <= set(frame.columns):
        return frame  # the column expectations will say what is missing
    ok = frame["status"] == "ok"
    usable = frame.loc[ok, ["sha256", "split", "label"]]  # not a copy of every column
    splits_per_content = usable.groupby("sha256")["split"].nunique()
    frame[SPLITS_SHARING_CONTENT] = frame["sha256"].map(splits_per_content).fillna(0)
    per_class = usable["label"].value_counts()
    frame[CLASS_IMAGES] = frame["label"].map(per_class).fillna(0).astype(int)
    per_class_train = usable[usable["split"] == "train"]["label"].value_counts()
    frame[CLASS_TRAIN_IMAGES] = frame["label"].map(per_class_train).fillna(0).astype(int)
    largest = per_class.max() if len(per_class) else 0
    frame[CLASS_IMBALANCE] = largest / frame[CLASS_IMAGES].where(frame[CLASS_IMAGES] > 0)
    if {"width", "height"} <= set(frame.columns):
        # As NumPy floats (NaN where unknown): Great Expectations compares those in bulk, the
        # manifest's nullable Int64 one Python call per row (seconds at a million rows).
        for column in ("width", "height"):
            frame[column] = frame[column].astype("float64")
        frame[PIXELS] = frame["width"] * frame["height"]
    return frame


def _manifest_suite(gx: Any, *, labels: Sequence[str], params: DataParams) -> list:
    from great_expectations.expectations.row_conditions import Column

    expect = gx.expectations
    is_ok = Column("status") == "ok"
    is_quarantined = Column("status") == "quarantined"
    suite: list = [
        expect.ExpectColumnToExist(column=column, description=f"column {column} exists")
        for column in MANIFEST_COLUMNS
    ]
    suite += [
        expect.ExpectColumnValuesToNotBeNull(column=column, description=f"{column} is filled in")
        for column in _NOT_NULL_COLUMNS
    ]
    suite += [
        expect.ExpectColumnValuesToBeUnique(column="path", description="one row per file"),
        expect.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(SPLITS), description="split is train, val or test"
        ),
        expect.ExpectColumnValuesToBeInSet(
            column="status", value_set=["ok", "quarantined"], description="status is known"
        ),
        expect.ExpectColumnValuesToBeInSet(
            column="label", value_set=list(labels), description="label is a class folder"
        ),
        expect.ExpectColumnValuesToMatchRegex(
            column="sha256",
            regex=r"^[0-9a-f]{64}$",
            row_condition=is_ok,
            description="usable images have a sha256",
        ),
        expect.ExpectColumnValuesToBeInSet(
            column="reason", value_set=[""], row_condition=is_ok, description="ok has no reason"
        ),
        expect.ExpectColumnValuesToNotBeInSet(
            column="reason",
            value_set=[""],
            row_condition=is_quarantined,
            description="every quarantined file says why",
        ),
        expect.ExpectCompoundColumnsToBeUnique(
            column_list=["split", "sha256"],
            row_condition=is_ok,
            description="no image appears twice in a split (e.g. under two labels)",
            meta={"fix": "Keep each image in one class folder only."},
        ),
        expect.ExpectColumnValuesToBeBetween(
            column=SPLITS_SHARING_CONTENT,
            max_value=1,
            row_condition=is_ok,
            description="no image is in more than one split (leakage)",
            meta={
                "fix": "Each image may be in one split only: remove the copies from all but one "
                "split folder."
            },
        ),
    ]
    min_size = params.min_size
    suite += [
        expect.ExpectColumnValuesToBeBetween(
            column=column,
            min_value=min_size,
            row_condition=is_ok,
            description=f"{column} of usable images is at least data.min_size = {min_size}",
        )
        for column in ("width", "height")
    ]
    suite += [
        expect.ExpectColumnValuesToBeBetween(
            column=PIXELS,
            max_value=params.max_pixels,
            row_condition=is_ok,
            description=f"usable images have at most data.max_pixels = {params.max_pixels}",
        ),
        expect.ExpectColumnValuesToBeInSet(
            column="reason",
            value_set=["", DUPLICATE],
            mostly=max(0.0, 1.0 - params.max_bad_fraction - _FRACTION_SLACK),
            description=(
                "too many bad files: at most data.max_bad_fraction = "
                f"{params.max_bad_fraction} of the files may be quarantined (duplicates aside)"
            ),
            meta={
                "fix": "Replace or remove the bad files in the data folder (graft never edits "
                "your data), or raise data.max_bad_fraction in params.yaml."
            },
        ),
        expect.ExpectColumnDistinctValuesToContainSet(
            column="label",
            value_set=list(labels),
            row_condition=is_ok,
            description="class under the minimum: every class folder has usable images",
            meta={"fix": _SMALL_CLASS_FIX},
        ),
        expect.ExpectColumnValuesToBeBetween(
            column=CLASS_IMAGES,
            min_value=minimum_images_per_class(params),
            row_condition=is_ok,
            description=(
                "class under the minimum: every class has at least "
                + (
                    "1 usable image (data.few_shot: true)"
                    if params.few_shot
                    else f"data.min_images_per_class = {params.min_images_per_class} usable "
                    "images (data.few_shot: false)"
                )
            ),
            meta={"fix": _SMALL_CLASS_FIX, "per_class": "class {label} has {value} usable images"},
        ),
        expect.ExpectColumnValuesToBeBetween(
            column=CLASS_TRAIN_IMAGES,
            min_value=1,
            row_condition=is_ok,
            description="every class has usable images in the train split",
            meta={"fix": _SMALL_CLASS_FIX, "per_class": "class {label} has no training images"},
        ),
        expect.ExpectColumnValuesToBeBetween(
            column=CLASS_IMBALANCE,
            max_value=params.max_class_imbalance,
            row_condition=is_ok,
            description=(
                "classes out of balance: the largest class has at most "
                f"data.max_class_imbalance = {params.max_class_imbalance} times the usable "
                "images of any other"
            ),
            meta={
                "fix": "Add images to the small classes, or raise data.max_class_imbalance in "
                "params.yaml (training weights classes by their size either way).",
                "per_class": "class {label} is {value} times smaller than the largest",
            },
        ),
    ]
    return suite


_SMALL_CLASS_FIX = (
    "Add images to those class folders, remove the folders, or lower "
    "data.min_images_per_class in params.yaml; with only 1-5 images per class, set "
    "data.few_shot: true (a prototype head, no fine-tuning)."
)


def minimum_images_per_class(params: DataParams) -> int:
    """Few-shot mode accepts a single image per class; otherwise data.min_images_per_class."""
    return 1 if params.few_shot else params.min_images_per_class


def _summarise(result: Any) -> dict[str, Any]:
    failed = [_describe_failure(item) for item in result.results if not item.success]
    return {
        "success": bool(result.success),
        "evaluated": len(result.results),
        "successful": len(result.results) - len(failed),
        "failed": failed,
    }


def _describe_failure(item: Any) -> dict[str, Any]:
    config = item.expectation_config
    column = config.kwargs.get("column") or ",".join(config.kwargs.get("column_list") or [])
    outcome = item.result or {}
    meta = config.meta or {}
    error = _exception_message(item.exception_info)
    offending = outcome.get("unexpected_index_list") or []
    files = sorted({row["path"] for row in offending})
    classes = {}
    if "per_class" in meta:
        classes = {str(row["label"]): _plain(row.get(column)) for row in offending}
    if error:
        details = f"could not be evaluated: {error}"
    elif classes:
        details = "; ".join(
            meta["per_class"].format(label=repr(label), value=value)
            for label, value in sorted(classes.items())
        )
    elif "unexpected_count" in outcome:
        details = f"{outcome['unexpected_count']} of {outcome.get('element_count')} rows fail"
    elif config.type == "expect_column_distinct_values_to_contain_set":
        missing = outcome.get("partial_missing_list") or sorted(
            set(config.kwargs["value_set"]) - set(outcome.get("observed_value") or [])
        )
        details = "no usable images in " + ", ".join(f"class {label!r}" for label in missing)
    else:
        details = f"observed {outcome.get('observed_value')!r}"
    return {
        "expectation": config.type,
        "column": column,
        "description": config.description or "",
        "details": details,
        "fix": meta.get("fix", ""),
        "files": files[:_MAX_LISTED_FILES],
        "classes": classes,
    }


def _plain(value: Any) -> Any:
    """A JSON-friendly number: 3 rather than numpy's 3, 2.5 rather than 2.5000000001."""
    if value is None or pd.isna(value):
        return None
    number = float(value)
    return int(number) if number.is_integer() else round(number, 2)


def _exception_message(info: Any) -> str:
    """GE reports errors either flat or keyed by metric; find the first message in either."""
    if not isinstance(info, dict):
        return ""
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "")
    for nested in info.values():
        message = _exception_message(nested)
        if message:
            return message
    return ""
