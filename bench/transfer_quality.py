"""Benchmark: graft's models against the textbook linear probe, on two public image sets.

The sets: the sample digits (scikit-learn's 1,797 scans, graft's own hash splits) and
``../shared/benchmarks/eurosat-dev`` (EuroSAT tiles, 10 classes, 100 train / 50 test each,
its fixed test split; val is drawn from train by graft). Each is set up as a user would
(images into ``data/``, graft's default ``params.yaml``), under ``bench/.work/<set>``, and its
features are computed once by the pipeline's own stages (the content-addressed cache).

Per set and seed (the seed shuffles the CV folds, and seeds the head and fine-tuning):
- **CV probe** (the baseline): scikit-learn's ``LogisticRegression`` on the same packaged Lite0
  features, ``C`` chosen by stratified 5-fold CV over train+val, refit on train+val;
- **graft head**: the ``train_head`` stage's function with the default ``head.*`` (shipped head);
- **graft final model**: the stages ``train_head``, ``finetune`` and ``evaluate`` with the
  defaults; the test accuracy of the candidate they ship (fewer seeds: it is minutes a run).
Test accuracy (mean, spread over seeds) and the seconds of each. Writes
bench/results/transfer_quality.json.

    python bench/transfer_quality.py [--sets digits eurosat] [--seeds 3] [--final-seeds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from threadpoolctl import threadpool_limits

from graft.config import HeadParams, load_params
from graft.features import load_feature_set
from graft.files import read_json
from graft.head import train_head
from graft.sample_data import write_sample_data
from graft.stages import evaluate, features, finetune, validate
from graft.stages import train_head as train_head_stage

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "transfer_quality.json"
WORK = ROOT / "bench" / ".work"
EUROSAT = ROOT.parent / "shared" / "benchmarks" / "eurosat-dev"
GRID = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]


def project(name: str) -> Path:
    """The set's project folder with graft's default params and its features computed."""
    root = WORK / name
    if not (root / "artifacts" / "features" / "test.npz").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        shutil.copy(ROOT / "params.yaml", root / "params.yaml")
        if name == "digits":
            write_sample_data(root / "data")
        else:
            for split in ("train", "test"):
                shutil.copytree(EUROSAT / split, root / "data" / split)
        validate.main(root)
        features.main(root)
    return root


def with_seed(root: Path, seed: int) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["head"]["seed"] = params["finetune"]["seed"] = seed
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def cv_probe(train_x, train_y, test_x, test_y, seed: int) -> float:
    """The baseline, written as one would by hand with scikit-learn."""
    search = GridSearchCV(
        LogisticRegression(max_iter=2000),
        {"C": GRID},
        cv=StratifiedKFold(5, shuffle=True, random_state=seed),
        n_jobs=1,
    )
    with threadpool_limits(1):
        search.fit(train_x, train_y)
    return float(search.score(test_x, test_y))


def graft_head(train, val, test, seed: int) -> float:
    result = train_head(
        train.features,
        train.labels,
        val.features,
        val.labels,
        int(max(train.labels.max(), val.labels.max(), test.labels.max())) + 1,
        HeadParams(seed=seed),
    )
    with torch.no_grad():
        logits = result.shipped(torch.from_numpy(test.features))
    return float((logits.argmax(1).numpy() == test.labels).mean())


def graft_final(root: Path, seed: int) -> dict:
    with_seed(root, seed)
    for stage in (train_head_stage, finetune, evaluate):
        stage.main(root)
    metrics = read_json(root / "metrics" / "eval.json")
    tuned = read_json(root / "metrics" / "finetune.json")
    return {"accuracy": metrics["accuracy"], "candidate": metrics["candidate"], "finetune": tuned}


def timed(function, *args):
    started = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - started


def summary(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "runs": values,
    }


def measure(name: str, seeds: int, final_seeds: int) -> dict:
    root = project(name)
    load_params(root / "params.yaml")  # the defaults parse
    split = {
        s: load_feature_set(root / "artifacts" / "features" / f"{s}.npz")
        for s in ("train", "val", "test")
    }
    pool_x = np.concatenate([split["train"].features, split["val"].features])
    pool_y = np.concatenate([split["train"].labels, split["val"].labels])
    probe, head, final = [], [], []
    probe_s, head_s, final_s = [], [], []
    for seed in range(seeds):
        accuracy, seconds = timed(
            cv_probe, pool_x, pool_y, split["test"].features, split["test"].labels, seed
        )
        probe.append(accuracy), probe_s.append(seconds)
        accuracy, seconds = timed(graft_head, split["train"], split["val"], split["test"], seed)
        head.append(accuracy), head_s.append(seconds)
    runs = []
    for seed in range(final_seeds):
        run, seconds = timed(graft_final, root, seed)
        final.append(run["accuracy"]), final_s.append(seconds), runs.append(run)
    out = {
        "images": {s: len(split[s]) for s in split},
        "cv_probe": {"test_accuracy": summary(probe), "seconds": summary(probe_s)},
        "graft_head": {"test_accuracy": summary(head), "seconds": summary(head_s)},
    }
    if final:
        out["graft_final"] = {
            "test_accuracy": summary(final),
            "seconds": summary(final_s),
            "candidates": [run["candidate"] for run in runs],
            "finetune": [run["finetune"] for run in runs],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["digits", "eurosat"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--final-seeds", type=int, default=1)
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in args.sets:
        results[name] = measure(name, args.seeds, args.final_seeds)
        results[name]["load_average_1min"] = os.getloadavg()[0]
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(json.dumps({k: v for k, v in results[name].items() if k != "graft_final"}, indent=1))
    results["note"] = (
        "seconds measured on 2 CPU cores shared with other jobs: compare within a set only"
    )
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
