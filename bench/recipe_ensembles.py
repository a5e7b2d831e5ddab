"""Benchmark: would averaging fine-tuned models (recipes, epochs) beat the best single one?

Reads the logits that ``bench/recipes.py --save-logits DIR`` wrote after every epoch of each
run (epoch 0: the head fit on train that fine-tuning starts from) and scores, on val and test,
every epoch of every run alone, the probability average of the runs at the same epoch, the
average of each run with its head, and each run's snapshots from ``--snapshot-from`` on. Test
is looked at to judge ensembling as an idea, never to choose. Writes
bench/results/recipe_ensembles.json.

    python bench/recipes.py --project PATH top2-frozen top3-frozen --set patience=8 \\
        --name _logits --save-logits /tmp/logits
    python bench/recipe_ensembles.py /tmp/logits [--snapshot-from 4]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from scipy.special import softmax

RESULTS = Path(__file__).parent / "results" / "recipe_ensembles.json"
FILE = re.compile(r"(?P<run>.+)_epoch(?P<epoch>\d+)\.npz")


def load_runs(folder: Path) -> tuple[dict[str, dict[int, tuple]], np.ndarray, np.ndarray]:
    """Per run and epoch: (val probabilities, test probabilities); and the val, test labels."""
    runs: dict[str, dict[int, tuple]] = {}
    labels = None
    for path in sorted(folder.glob("*.npz")):
        match = FILE.fullmatch(path.name)
        if match is None:
            continue
        with np.load(path) as saved:
            probabilities = (softmax(saved["val"], 1), softmax(saved["test"], 1))
            labels = (saved["val_labels"], saved["test_labels"])
        runs.setdefault(match["run"], {})[int(match["epoch"])] = probabilities
    if labels is None:
        raise SystemExit(f"no <run>_epoch<N>.npz files in {folder}")
    return runs, *labels


def scores(members: list[tuple], val_labels: np.ndarray, test_labels: np.ndarray) -> dict:
    """Val and test accuracy of the members' mean probability."""
    val = np.mean([member[0] for member in members], axis=0)
    test = np.mean([member[1] for member in members], axis=0)
    return {
        "val_accuracy": round(float((val.argmax(1) == val_labels).mean()), 4),
        "test_accuracy": round(float((test.argmax(1) == test_labels).mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--snapshot-from", type=int, default=4)
    args = parser.parse_args()
    runs, val_labels, test_labels = load_runs(args.folder)
    names = sorted(runs)
    epochs = sorted(set.intersection(*(set(runs[name]) for name in names)) - {0})
    table = []
    for epoch in epochs:
        row = {"epoch": epoch}
        for name in names:
            row[name] = scores([runs[name][epoch]], val_labels, test_labels)
            row[f"{name} + head"] = scores(
                [runs[name][epoch], runs[name][0]], val_labels, test_labels
            )
        if len(names) > 1:
            row[" + ".join(names)] = scores(
                [runs[name][epoch] for name in names], val_labels, test_labels
            )
        table.append(row)
        print(json.dumps(row))
    snapshots = {
        name: scores(
            [runs[name][e] for e in epochs if e >= args.snapshot_from], val_labels, test_labels
        )
        for name in names
    }
    heads = {name: scores([runs[name][0]], val_labels, test_labels) for name in names}
    print(json.dumps({"heads": heads, f"snapshots from epoch {args.snapshot_from}": snapshots}))
    RESULTS.write_text(
        json.dumps(
            {
                "logits": str(args.folder),
                "runs": names,
                "val_images": len(val_labels),
                "test_images": len(test_labels),
                "heads": heads,
                "per_epoch": table,
                "snapshot_from": args.snapshot_from,
                "snapshots": snapshots,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
