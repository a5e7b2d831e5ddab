"""The matplotlib helpers every report plot uses: a headless pyplot, and reproducible PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graft.files import replacing


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, dest: Path) -> None:
    """Write a figure through a temporary file; no software tag, so reruns give the same bytes."""
    figure.tight_layout()
    with replacing(dest) as temporary:
        figure.savefig(temporary, format="png", dpi=100, metadata={"Software": None})
    pyplot().close(figure)
