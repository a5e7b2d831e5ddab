"""Progress bars that also work where nobody watches a terminal (CI logs, Prefect task logs)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(total: int, description: str, unit: str = "img") -> tqdm:
    """A tqdm bar with a rate; outside a terminal it redraws only every 10 s, one log line each."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        mininterval=0.1 if interactive else 10.0,
        ascii=not interactive,
        dynamic_ncols=interactive,
    )
