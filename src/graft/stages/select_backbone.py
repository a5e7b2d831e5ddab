"""Stage ``select_backbone`` (``graft select-backbone``): rank the ``select.candidates``.

Scores each candidate by quick probes on cached features (:mod:`graft.studies.selection`),
writes ``reports/backbone_selection.{json,md}`` and ``plots/backbone_selection.png``, and with
``apply`` sets the best one's ``backbone`` keys in ``params.yaml``
(:func:`graft.params_editor.apply_backbone`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graft.config import load_params
from graft.data.manifest import read_manifest
from graft.files import write_json, write_text_atomic
from graft.params_editor import apply_backbone
from graft.paths import ProjectPaths
from graft.studies.selection import (
    backbone_change,
    rank_backbones,
    save_selection_plot,
    selection_markdown,
    selection_report,
)


def main(root: Path = Path("."), apply: bool = False) -> tuple[dict[str, Any], bool]:
    """Rank the candidates, write the reports, and apply the best if asked and needed.

    Returns:
        The report and whether params.yaml was changed.
    """
    paths = ProjectPaths(root)
    params = load_params(paths.params)
    manifest = read_manifest(paths.manifest)
    scores = rank_backbones(
        manifest,
        paths.data,
        params,
        paths.root / params.features.cache_dir,
        on_candidate=lambda c: print(f"select-backbone: {c.name} ({c.weights})"),
    )
    report = selection_report(scores, params.backbone)
    applied = False
    if apply and report["change_needed"]:
        applied = apply_backbone(paths.params, backbone_change(scores[0]))
    reports = paths.root / "reports"
    write_json(reports / "backbone_selection.json", {**report, "applied": applied})
    write_text_atomic(reports / "backbone_selection.md", selection_markdown(report, applied))
    save_selection_plot(scores, paths.plots / "backbone_selection.png")
    return report, applied
