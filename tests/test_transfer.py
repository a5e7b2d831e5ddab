"""The transfer-benefit report: both arms, the three figures, both curves, data efficiency.

One tiny project (test_efficientnet, 32 px, 2 epochs, 12 digits per class) runs validate,
`graft pretrain` and `graft transfer-report`; the figures' logic is also checked on made-up runs.
"""

from __future__ import annotations

import csv

import pytest
from typer.testing import CliRunner

from graft.cli import app
from graft.files import read_json
from graft.stages import validate
from graft.transfer import ArmRun, TransferComparison
from tests.conftest import make_project

TINY = {
    "pretrain": {
        "architecture": "test_efficientnet",
        "image_size": 32,
        "training": {"epochs": 1, "batch_size": 16},
    },
    "transfer": {"fractions": [0.5, 1.0], "training": {"epochs": 2, "batch_size": 16}},
}


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    paths = make_project(tmp_path_factory.mktemp("transfer") / "project", overrides=TINY)
    validate.main(paths.root)
    for command in ("pretrain", "transfer-report"):
        result = CliRunner().invoke(app, [command, "--root", str(paths.root)])
        assert result.exit_code == 0, result.output
    return paths


def rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_report_has_the_three_figures_both_curves_and_data_efficiency(reported):
    report = (reported.root / "reports" / "transfer.md").read_text()
    for figure in (
        "initial skill: probe accuracy (before any fine-tuning)",
        "initial skill: accuracy after the first epoch",
        "rate of improvement: epochs to 97.0%",
        "rate of improvement: seconds to 97.0%",
        "converged skill: accuracy after the last epoch",
        "converged skill: test accuracy",
    ):
        line = next(line for line in report.splitlines() if figure in line)
        assert line.count("|") == 5 and "—" not in line, line  # both arms have a value
    assert "## Learning curves" in report and "../plots/transfer/curves.png" in report
    assert "## Data efficiency" in report and "| 50% |" in report and "| 100% |" in report
    assert "test_efficientnet" in report and "graft pretrain" in report


def test_both_learning_curves_are_dvc_plots_by_epoch_and_by_seconds(reported):
    plots = reported.root / "plots" / "transfer"
    for arm in ("transferred", "scratch"):
        curve = rows(plots / f"curve_{arm}.csv")
        assert [int(r["epoch"]) for r in curve] == [0, 1, 2]  # 0: the probe
        seconds = [float(r["seconds"]) for r in curve]
        assert seconds == sorted(seconds) and seconds[0] > 0
        assert all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in curve)
    efficiency = rows(plots / "data_efficiency.csv")
    assert [float(r["fraction"]) for r in efficiency] == [0.5, 1.0]
    assert int(efficiency[0]["train_images"]) < int(efficiency[1]["train_images"])
    assert (plots / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (plots / "data_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    metrics = read_json(reported.metrics / "transfer.json")
    assert {"transferred_probe_val_accuracy", "scratch_test_accuracy"} <= set(metrics)
    assert set(read_json(reported.root / "reports" / "transfer.json")["ahead"]) == {
        "initial_skill",
        "rate_of_improvement",
        "converged_skill",
    }


def arm(name: str, probe: float, curve: list[tuple[float, float]], test: float) -> ArmRun:
    history = [{"epoch": 0, "seconds": 1.0, "val_accuracy": probe}] + [
        {"epoch": i + 1, "seconds": seconds, "val_accuracy": accuracy}
        for i, (seconds, accuracy) in enumerate(curve)
    ]
    return ArmRun(name, 1.0, 100, probe, max(a for _, a in curve), test, curve[-1][0], history)


def test_the_figures_come_from_the_curves():
    comparison = TransferComparison(
        [
            arm("transferred", 0.8, [(2.0, 0.85), (3.0, 0.92), (4.0, 0.95)], 0.94),
            arm("scratch", 0.3, [(2.5, 0.5), (3.5, 0.7), (4.5, 0.95)], 0.93),
        ],
        target_accuracy=0.9,
    )
    t, s = comparison.figures("transferred"), comparison.figures("scratch")
    assert (t.probe_val_accuracy, t.first_epoch_val_accuracy) == (0.8, 0.85)
    assert (t.epochs_to_target, t.seconds_to_target) == (2, 3.0)
    assert (s.epochs_to_target, s.seconds_to_target) == (3, 4.5)
    assert (t.final_val_accuracy, s.final_val_accuracy) == (0.95, 0.95)
    # Equal final val accuracy: the test accuracy decides converged skill.
    assert comparison.ahead() == {
        "initial_skill": True,
        "rate_of_improvement": True,
        "converged_skill": True,
    }


def test_a_scratch_arm_that_is_as_good_is_not_called_behind():
    comparison = TransferComparison(
        [
            arm("transferred", 0.5, [(2.0, 0.6), (3.0, 0.8)], 0.8),
            arm("scratch", 0.5, [(2.0, 0.95), (3.0, 0.97)], 0.96),
        ],
        target_accuracy=0.9,
    )
    assert comparison.figures("transferred").epochs_to_target is None
    assert comparison.ahead() == {
        "initial_skill": False,
        "rate_of_improvement": False,
        "converged_skill": False,
    }
