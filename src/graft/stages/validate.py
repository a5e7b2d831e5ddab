"""Stage ``validate``: check every raw image, write the manifest, the report and the counts."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from graft.config import load_params
from graft.data.manifest import write_manifest
from graft.files import read_json, write_json
from graft.parallel import mapper_for
from graft.paths import ProjectPaths
from graft.validate import MAX_LISTED_FILES, ValidationResult, validate

SUMMARY_NAME = "summary.json"
METRICS_NAME = "validation.json"
DATA_DOCS_NAME = "data_docs"


def main(root: Path = Path(".")) -> ValidationResult:
    """Validate ``root/data`` with ``params.yaml``'s ``data`` section and write the outputs.

    Writes ``artifacts/manifest.csv``, ``artifacts/data_profile.json`` (read first as the drift
    baseline, replaced only when validation passes), ``reports/validation/summary.json``,
    ``reports/validation/data_docs/`` (Great Expectations' HTML Data Docs) and
    ``metrics/validation.json``; never anything under ``data/``.

    Raises:
        DataValidationError: the data cannot be trained on (see :func:`graft.validate.validate`).
        ParamsError: ``params.yaml`` is missing or invalid.
    """
    paths = ProjectPaths(Path(root))
    params = load_params(paths.params)
    profile_path = paths.data_profile
    baseline = read_json(profile_path) if profile_path.is_file() else None
    # Every core here, or the Dask cluster extraction uses: where files are checked, not what.
    with mapper_for(params.features.dask_scheduler, "features.dask_scheduler") as map_images:
        result = validate(
            paths.data,
            params.data,
            baseline=baseline,
            data_docs_dir=paths.validation_reports / DATA_DOCS_NAME,
            map_images=map_images,
        )
    write_manifest(result.manifest, paths.manifest)
    write_json(paths.validation_reports / SUMMARY_NAME, result.summary)
    write_json(paths.metrics / METRICS_NAME, validation_metrics(result.summary))
    write_json(profile_path, result.profile)
    print_report(result.summary, paths)
    return result


def validation_metrics(summary: dict) -> dict[str, int | float]:
    """The counts (and drift, when there is a baseline) DVC tracks as the stage's metric."""
    metrics: dict[str, int | float] = {
        "images": summary["images"],
        "ok": summary["ok"],
        "quarantined": summary["quarantined"],
        "bad": summary["bad"],
        "duplicates": summary["duplicates"],
        "classes": len(summary["classes"]),
        **summary["splits"],
    }
    drift = summary["drift"]
    if drift["baseline"]:
        metrics["drift_label_linf"] = drift["label_linf"]
        metrics.update({f"drift_js_{name}": value for name, value in drift["js"].items()})
    return metrics


def print_report(summary: dict, paths: ProjectPaths, console: Console | None = None) -> None:
    """A short human report: the counts, then the quarantined files and why."""
    console = console or Console()
    splits = ", ".join(f"{split} {count}" for split, count in summary["splits"].items())
    console.print(
        f"validate: {summary['images']} images in {len(summary['classes'])} classes "
        f"({summary['layout']['kind']}); {summary['ok']} ok, "
        f"{summary['quarantined']} quarantined; usable per split: {splits}"
    )
    drift = summary["drift"]
    if not drift["baseline"]:
        console.print(f"drift: {drift['note']}")
    else:
        js = ", ".join(f"{name} {value:.3f}" for name, value in drift["js"].items())
        console.print(
            f"drift vs the previous validated data ({drift['previous_images']} images): labels "
            f"L-inf {drift['label_linf']:.3f}, Jensen-Shannon {js}"
        )
        for exceeded in drift["exceeded"]:
            console.print(
                Text(f"drift above threshold (reported; data.drift_gate is off): {exceeded}")
            )
    ignored = summary["ignored_files"]["count"]
    if ignored:
        console.print(f"ignored {ignored} files that are not images in class folders")
    quarantined = summary["quarantined_files"]
    if not quarantined:
        return
    console.print(f"quarantined {len(quarantined)} files (skipped; nothing under data/ changed):")
    table = Table("file", "reason")
    for entry in quarantined[:MAX_LISTED_FILES]:
        table.add_row(Text(entry["path"]), Text(entry["reason"]))
    console.print(table)
    if len(quarantined) > MAX_LISTED_FILES:
        console.print(
            f"... and {len(quarantined) - MAX_LISTED_FILES} more: see "
            f"{paths.validation_reports / SUMMARY_NAME}"
        )
