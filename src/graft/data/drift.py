"""Drift of a data version against the previous validated one.

A *profile* summarises the usable images of one data version: how many per class, and
histograms of width, height and mean brightness over fixed bins (the same bins for every
version, so any two profiles compare). :func:`compare_profiles` measures how far two profiles
are apart: the L-infinity distance of the label distributions (the largest change of any class's
share of the images) and the Jensen-Shannon distance (base 2: 0 for equal histograms, 1 for
disjoint ones) of each image statistic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from graft.config import DataParams
from graft.data.manifest import is_usable

PROFILE_VERSION = 1
# Half-octave bins from 1 to 2^17 pixels: a resize by a factor of 1.4 or more changes bin.
_SIZE_EDGES = [2 ** (step / 2) for step in range(35)]
_BIN_EDGES = {
    "width": _SIZE_EDGES,
    "height": _SIZE_EDGES,
    "brightness": list(range(0, 257, 8)),
}


def profile_manifest(manifest: pd.DataFrame) -> dict[str, Any]:
    """The profile of the usable (``ok``) rows of a manifest; JSON-serialisable."""
    ok = is_usable(manifest)  # a column at a time: a frame of the usable rows would copy all
    labels = manifest.loc[ok, "label"].value_counts()
    return {
        "version": PROFILE_VERSION,
        "images": int(ok.sum()),
        "labels": {str(label): int(labels[label]) for label in sorted(labels.index)},
        "bin_edges": _BIN_EDGES,
        "histograms": {
            statistic: _histogram(manifest.loc[ok, statistic], edges)
            for statistic, edges in _BIN_EDGES.items()
        },
    }


def compare_profiles(
    previous: dict[str, Any] | None, current: dict[str, Any], params: DataParams
) -> dict[str, Any]:
    """How far ``current`` drifted from ``previous``, against the thresholds in ``params``.

    Args:
        previous: the profile of the previous validated data version, or None if there is none.
        current: the profile of the data being validated.
        params: ``drift_max_label_linf``, ``drift_max_js`` and ``drift_gate`` are read.

    Returns:
        ``baseline`` (whether there was a comparable previous profile), ``label_linf`` and the
        class that moved most, ``js`` per statistic, the ``thresholds``, ``exceeded`` (one
        sentence per threshold crossed, naming its parameter) and ``gate``. Without a baseline
        only ``baseline``, ``note``, ``exceeded`` (empty) and ``gate`` are present.
    """
    if previous is None:
        return _no_baseline("no baseline: this is the first validated data version")
    if previous.get("version") != PROFILE_VERSION or previous.get("bin_edges") != _BIN_EDGES:
        return _no_baseline("no baseline: the previous profile was written by another graft")
    shares_before, shares_now = _shares(previous["labels"]), _shares(current["labels"])
    moves = {
        label: shares_now.get(label, 0.0) - shares_before.get(label, 0.0)
        for label in sorted(set(shares_before) | set(shares_now))
    }
    moved_most = max(moves, key=lambda label: abs(moves[label]))
    label_linf = abs(moves[moved_most])
    js = {
        statistic: _js_distance(previous["histograms"][statistic], counts)
        for statistic, counts in current["histograms"].items()
    }
    exceeded = []
    if label_linf > params.drift_max_label_linf:
        exceeded.append(
            f"label distribution moved by {label_linf:.3f} (class {moved_most!r}: "
            f"{shares_before.get(moved_most, 0.0):.1%} -> {shares_now.get(moved_most, 0.0):.1%} "
            f"of the images), above data.drift_max_label_linf = {params.drift_max_label_linf}"
        )
    for statistic, distance in js.items():
        if distance > params.drift_max_js:
            exceeded.append(
                f"image {statistic} histogram moved by {distance:.3f} (Jensen-Shannon), above "
                f"data.drift_max_js = {params.drift_max_js}"
            )
    return {
        "baseline": True,
        "previous_images": int(previous["images"]),
        "label_linf": round(label_linf, 6),
        "label_moved_most": moved_most,
        "js": {statistic: round(distance, 6) for statistic, distance in js.items()},
        "thresholds": {
            "drift_max_label_linf": params.drift_max_label_linf,
            "drift_max_js": params.drift_max_js,
        },
        "exceeded": exceeded,
        "gate": params.drift_gate,
    }


def _no_baseline(note: str) -> dict[str, Any]:
    return {"baseline": False, "note": note, "exceeded": [], "gate": False}


def _histogram(values: pd.Series, edges: list[float]) -> list[int]:
    numbers = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    counts, _ = np.histogram(np.clip(numbers, edges[0], edges[-1]), bins=edges)
    return [int(count) for count in counts]


def _shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {label: count / total for label, count in counts.items()} if total else {}


def _js_distance(before: list[int], now: list[int]) -> float:
    p, q = np.asarray(before, dtype=float), np.asarray(now, dtype=float)
    if p.sum() == 0 or q.sum() == 0:
        return 0.0 if p.sum() == q.sum() else 1.0
    # Imported here: scipy.spatial takes a quarter of a second, paid before validation's
    # workers start if imported with this module, and for free once Great Expectations is in.
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(p, q, base=2))
