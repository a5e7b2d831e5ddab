"""Great Expectations suite over the manifest: the table-level contract later stages rely on.

Pillow checks each file's bytes (see :mod:`graft.data.images`); this suite checks the table:
required columns, allowed values, sizes, labels, and that no image content is shared between
splits (leakage). Great Expectations is imported only when the suite runs, since importing it
takes seconds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from graft.data.manifest import MANIFEST_COLUMNS
from graft.data.splits import SPLITS

# Per ok row: in how many splits its content appears. More than one is leakage.
SPLITS_SHARING_CONTENT = "splits_sharing_content"
_NOT_NULL_COLUMNS = ("path", "label", "split", "sha256", "status")
_MAX_LISTED_FILES = 20


def run_manifest_expectations(
    manifest: pd.DataFrame, *, labels: Sequence[str], min_size: int
) -> dict[str, Any]:
    """Validate the manifest with a Great Expectations suite in an ephemeral context.

    Args:
        manifest: the table built by :func:`graft.data.manifest.build_manifest`.
        labels: the class folders discovered under the data folder.
        min_size: smallest accepted width or height of an ok image, in pixels.

    Returns:
        A JSON-serialisable summary: ``success``, ``evaluated``, ``successful`` and ``failed``,
        a list of ``{expectation, column, description, details, files}`` where ``files`` holds
        up to 20 offending paths.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("graft").add_dataframe_asset("manifest")
    batch = asset.add_batch_definition_whole_dataframe("manifest").get_batch(
        batch_parameters={"dataframe": _with_split_sharing(manifest)}
    )
    suite = gx.ExpectationSuite(name="graft_manifest")
    for expectation in _manifest_suite(gx, labels=labels, min_size=min_size):
        suite.add_expectation(expectation)
    result = batch.validate(
        suite,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]},
    )
    return _summarise(result)


def _with_split_sharing(manifest: pd.DataFrame) -> pd.DataFrame:
    frame = manifest.copy()
    if {"sha256", "split", "status"} <= set(frame.columns):
        ok = frame["status"] == "ok"
        splits_per_content = frame[ok].groupby("sha256")["split"].nunique()
        frame[SPLITS_SHARING_CONTENT] = frame["sha256"].map(splits_per_content).fillna(0)
    return frame


def _manifest_suite(gx: Any, *, labels: Sequence[str], min_size: int) -> list:
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
        ),
        expect.ExpectColumnValuesToBeBetween(
            column=SPLITS_SHARING_CONTENT,
            max_value=1,
            row_condition=is_ok,
            description="no image is in more than one split (leakage)",
        ),
    ]
    suite += [
        expect.ExpectColumnValuesToBeBetween(
            column=column,
            min_value=min_size,
            row_condition=is_ok,
            description=f"{column} of usable images is at least min_size={min_size}",
        )
        for column in ("width", "height")
    ]
    return suite


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
    error = _exception_message(item.exception_info)
    files = sorted({row["path"] for row in outcome.get("unexpected_index_list") or []})
    if error:
        details = f"could not be evaluated: {error}"
    elif "unexpected_count" in outcome:
        details = f"{outcome['unexpected_count']} of {outcome.get('element_count')} rows fail"
    else:
        details = f"observed {outcome.get('observed_value')!r}"
    return {
        "expectation": config.type,
        "column": column,
        "description": config.description or "",
        "details": details,
        "files": files[:_MAX_LISTED_FILES],
    }


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
