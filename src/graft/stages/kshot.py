"""Stage ``kshot`` (``graft kshot``): the data-efficiency curve of the few-shot heads.

Embeds train, val and test through the feature cache, draws the curve
(:mod:`graft.studies.kshot`) and writes ``reports/kshot.json``, ``reports/kshot.md`` and
``plots/kshot.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graft.config import load_params
from graft.data.manifest import read_manifest, usable_labels, usable_rows
from graft.embedding import embed
from graft.files import write_json, write_text_atomic
from graft.paths import ProjectPaths
from graft.studies.kshot import (
    KShotError,
    kshot_curve,
    kshot_markdown,
    kshot_report,
    probe_c_on_val,
    save_kshot_plot,
)


def main(root: Path = Path(".")) -> dict[str, Any]:
    """Draw the curve and write it; returns the report.

    Raises:
        KShotError: if train or test has no usable images.
    """
    paths = ProjectPaths(root)
    params = load_params(paths.params)
    manifest = read_manifest(paths.manifest)
    usable = usable_rows(manifest)
    for split in ("train", "test"):
        if not (usable["split"] == split).any():
            raise KShotError(
                f"no usable {split} images in {paths.manifest}: add images or rerun "
                "`graft validate` with other data.val_fraction / data.test_fraction."
            )
    labels = usable_labels(manifest)
    embedding = embed(
        usable,
        paths.data,
        params.backbone,
        params.features,
        paths.root / params.features.cache_dir,
        labels=labels,
        precision="fp32",
    )
    sets = embedding.feature_sets
    train, val, test = sets["train"], sets["val"], sets["test"]
    kshot, probe_c = params.kshot, params.fewshot.probe_c
    curve = kshot_curve(train, test, len(labels), kshot.k, kshot.seeds, probe_c)
    probe_c_val = (
        probe_c_on_val(train, val, len(labels), kshot.k, kshot.seeds, kshot.probe_c_grid)
        if len(val)
        else None
    )
    report = kshot_report(
        curve, test, params.backbone.model_dump(), kshot.seeds, probe_c, probe_c_val
    )
    reports = paths.root / "reports"
    write_json(reports / "kshot.json", report)
    write_text_atomic(reports / "kshot.md", kshot_markdown(report))
    save_kshot_plot(report, paths.plots / "kshot.png")
    return report
