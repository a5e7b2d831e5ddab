"""Nothing is chosen on test: with every test label changed, every choice stays the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from graft.files import read_json
from graft.paths import ProjectPaths
from graft.sample_data import digit_images
from graft.stages import evaluate, features, finetune, train_head, validate
from tests.conftest import write_params

TEST_PER_CLASS = 3


def _project(root: Path, relabel_test) -> ProjectPaths:
    """Fixed splits of real digits: the first images of each class in test (under the class
    ``relabel_test`` gives), the rest in train (val is drawn from train by content hash)."""
    root.mkdir(parents=True)
    write_params(root, {"data": {"invariances": ["hflip"]}})  # so that TTA is chosen too
    seen: dict[str, int] = {}
    for label, name, png in digit_images(per_class=12):
        seen[label] = seen.get(label, 0) + 1
        split, folder = "train", label
        if seen[label] <= TEST_PER_CLASS:
            split, folder = "test", relabel_test(label)
        path = root / "data" / split / folder / f"{label}_{name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
    return ProjectPaths(root)


def _choices(paths: ProjectPaths) -> dict:
    for stage in (validate, features, train_head, finetune, evaluate):
        stage.main(paths.root)
    head = read_json(paths.metrics / "head.json")
    tuned = read_json(paths.metrics / "finetune.json")
    for trial in (tuned.get("recipes") or {}).values():
        trial.pop("seconds", None)  # how long a recipe's trial took: timing, not a choice
    return {
        "head": head,  # the probe's C, its CV scores, its val accuracy
        "finetune": tuned,  # its best epoch, the candidate (over half-splits), the temperature
        "candidate": read_json(paths.metrics / "eval.json")["candidate"],
        "tta": _without_test_figures(read_json(paths.metrics / "eval.json")["tta"]),
        "blessed_tta": read_json(paths.blessing)["tta"],
    }


def _without_test_figures(tta: dict) -> dict:
    """The TTA decision (made on val) without the test accuracy it reports beside it."""
    return {key: value for key, value in tta.items() if key != "test_accuracy_without"}


@pytest.mark.longest
def test_shuffled_test_labels_change_no_choice(tmp_path):
    original = _project(tmp_path / "original", lambda label: label)
    shuffled = _project(tmp_path / "shuffled", lambda label: str((int(label) + 1) % 10))
    before, after = _choices(original), _choices(shuffled)
    assert before == after
    # ... while the test labels did change, and test scores moved with them
    details = [read_json(p.evaluation_details)["head"] for p in (original, shuffled)]
    assert details[0]["confusion_matrix"] != details[1]["confusion_matrix"]
