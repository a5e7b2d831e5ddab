"""`graft kshot`: k images per class, several draws, mean and spread of test accuracy."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from graft.cli import app
from graft.features import FeatureSet
from graft.stages import validate
from graft.studies.kshot import (
    kshot_curve,
    kshot_markdown,
    kshot_report,
    probe_c_on_val,
    sample_k_per_class,
)
from tests.conftest import make_project


def test_sampling_takes_k_of_each_class_or_all_of_a_smaller_one():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 6)
    index = sample_k_per_class(labels, 5, np.random.default_rng(0))
    assert np.bincount(labels[index]).tolist() == [5, 3, 5]
    again = sample_k_per_class(labels, 5, np.random.default_rng(0))
    other = sample_k_per_class(labels, 5, np.random.default_rng(1))
    assert index.tolist() == again.tolist() and index.tolist() != other.tolist()


def clusters(rng: np.random.Generator, per_class: int, classes: int = 4) -> FeatureSet:
    centres = np.eye(classes, 32) * 3.0
    labels = np.repeat(np.arange(classes), per_class)
    features = centres[labels] + 1.0 * rng.standard_normal((len(labels), 32))
    return FeatureSet(features.astype(np.float32), labels, np.array([""] * len(labels)), labels)


def test_more_shots_give_higher_accuracy_and_the_spread_comes_from_the_draws():
    rng = np.random.default_rng(0)
    train, test = clusters(rng, 40), clusters(rng, 50)
    curve = kshot_curve(train, test, 4, [1, 20], seeds=6, probe_c=10.0)
    one, twenty = curve
    for head in ("prototype", "probe"):
        assert len(one[head]["runs"]) == 6 and np.isclose(
            one[head]["mean"], np.mean(one[head]["runs"])
        )
        assert one[head]["std"] > 0.0  # different draws, different accuracies
        assert twenty[head]["mean"] > one[head]["mean"] + 0.1
        assert twenty[head]["mean"] > 0.9
    assert one["train_images_per_seed"] == 4 and twenty["train_images_per_seed"] == 80
    assert not twenty["capped"]


def test_the_probe_c_is_scored_on_val_and_the_report_names_val_s_choice():
    rng = np.random.default_rng(0)
    train, val, test = clusters(rng, 40), clusters(rng, 30), clusters(rng, 30)
    grid = [0.001, 10.0]
    table = probe_c_on_val(train, val, 4, [1, 10], seeds=3, grid=grid)
    assert [row["k"] for row in table] == [1, 10]
    for row in table:  # the best mean on val; then the smallest C within one standard error
        scores = row["val_accuracy"]
        assert set(scores) == {"0.001", "10"} and 0.5 < min(scores.values())
        assert row["best_c"] == max(grid, key=lambda c: (scores[f"{c:g}"], -c))
        assert row["best_standard_error"] > 0.0
        within = [
            c
            for c in grid
            if scores[f"{c:g}"] >= scores[f"{row['best_c']:g}"] - row["best_standard_error"]
        ]
        assert row["chosen_c"] == min(within)
    single = probe_c_on_val(train, val, 4, [10], seeds=1, grid=grid)[0]
    assert single["best_standard_error"] == 0.0 and single["chosen_c"] == single["best_c"]
    # The val split decides: scored on other images, the same draws give other accuracies.
    assert probe_c_on_val(train, test, 4, [1, 10], 3, grid) != table

    curve = kshot_curve(train, test, 4, [1, 10], seeds=3, probe_c=10.0)
    backbone = {"name": "tiny", "weights": "random"}
    agreeing = [{**row, "chosen_c": 10.0} for row in table]
    markdown = kshot_markdown(kshot_report(curve, test, backbone, 3, 10.0, agreeing))
    assert "The probe's C, chosen on val" in markdown
    assert "Val chooses `fewshot.probe_c` = 10 at every k." in markdown
    assert f"| 10 | {table[1]['val_accuracy']['0.001']:.4f} | **" in markdown
    other = [{**table[0], "chosen_c": 10.0}, {**table[1], "chosen_c": 0.001}]
    markdown = kshot_markdown(kshot_report(curve, test, backbone, 3, 10.0, other))
    assert "Val chooses another C than `fewshot.probe_c` = 10 at k = 10." in markdown
    unchecked = kshot_markdown(kshot_report(curve, test, backbone, 3, 10.0, None))
    assert "No val images" in unchecked


def test_kshot_command_writes_the_curve_report_and_plot(tmp_path):
    paths = make_project(tmp_path / "p", per_class=12, overrides={"kshot": {"k": [1, 3, 50]}})
    validate.main(paths.root)
    result = CliRunner().invoke(app, ["kshot", "--root", str(paths.root)])
    assert result.exit_code == 0, result.output
    report = json.loads((paths.root / "reports" / "kshot.json").read_text())
    assert [point["k"] for point in report["curve"]] == [1, 3, 50]
    assert report["seeds"] == 5 and all(len(p["probe"]["runs"]) == 5 for p in report["curve"])
    assert report["curve"][0]["train_images_per_seed"] == 10
    assert report["curve"][2]["capped"]  # no class has 50 train images: all of them are used
    assert report["test_images"] > 0 and report["test_interval_width_at_50pct"] > 0.2
    markdown = (paths.root / "reports" / "kshot.md").read_text()
    assert "| 3 | 30 |" in markdown and "do not over-read" in markdown
    assert (paths.plots / "kshot.png").read_bytes()[:4] == b"\x89PNG"
    assert "k=1: prototype" in result.output
    assert [row["k"] for row in report["probe_c_on_val"]] == [1, 3, 50]
    assert "val chooses probe C = " in result.output and "chosen on val" in markdown
