"""The transfer-benefit report: both arms, the three figures, both curves, data efficiency.

One tiny project (test_efficientnet, 32 px, 2 epochs, 2 seeds, 12 digits per class) runs
validate, `graft pretrain` and `graft transfer-report`; the figures' logic (means, spread,
verdicts) is also checked on made-up runs. One slow test runs the default settings on the whole
sample and asserts what the README claims: the transferred arm ahead on all three benefits.
"""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from typer.testing import CliRunner

from graft.cli import app
from graft.files import read_json
from graft.stages import validate
from graft.studies.transfer import ArmRun, Spread, TransferComparison
from tests.conftest import REPO_ROOT, make_project

TINY = {
    "pretrain": {
        "architecture": "test_efficientnet",
        "image_size": 32,
        "training": {"epochs": 1, "batch_size": 16},
    },
    "transfer": {
        "fractions": [0.5, 1.0],
        "seeds": 2,
        "training": {"epochs": 2, "batch_size": 16},
    },
}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Torch on one thread while these tests run: with the tiny model on 2 shared cores, two
    intra-op threads waiting on each other made the runs several times slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        # mean ± std, and the seed-by-seed count (unless an arm never reached the target)
        assert " ± " in line and ("of 2 seeds" in line or "never reached" in line), line
    for benefit in ("initial skill", "rate of improvement", "converged skill"):
        assert f"| {benefit} | " in report
    assert "2 seeds (0, 1)" in report
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
        for r in curve:  # the mean over both seeds, inside their range
            assert float(r["val_accuracy_min"]) <= float(r["val_accuracy"])
            assert float(r["val_accuracy"]) <= float(r["val_accuracy_max"]) <= 1.0
            assert float(r["val_accuracy_std"]) >= 0 and r["runs"] == "2"
    efficiency = rows(plots / "data_efficiency.csv")
    assert [float(r["fraction"]) for r in efficiency] == [0.5, 1.0]
    assert int(efficiency[0]["train_images"]) < int(efficiency[1]["train_images"])
    assert {"transferred", "scratch", "transferred_std", "scratch_max"} <= set(efficiency[0])
    assert (plots / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (plots / "data_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    metrics = read_json(reported.metrics / "transfer.json")
    assert {"transferred_probe_val_accuracy", "scratch_test_accuracy_std"} <= set(metrics)
    assert metrics["seeds"] == 2
    summary = read_json(reported.root / "reports" / "transfer.json")
    benefits = {"initial_skill", "rate_of_improvement", "converged_skill"}
    assert set(summary["ahead"]) == set(summary["beyond_spread"]) == benefits
    assert sorted({(r["seed"], r["fraction"], r["arm"]) for r in summary["runs"]}) == sorted(
        (seed, fraction, arm)
        for seed in (0, 1)
        for fraction in (0.5, 1.0)
        for arm in ("transferred", "scratch")
    )


def test_each_seed_draws_its_own_share_of_train_and_its_own_scratch_initialisation():
    import numpy as np

    from graft.backbones import create_backbone
    from graft.studies.pretrain import LabelledImages
    from graft.studies.transfer import initialise_randomly

    def trunk(seed: int) -> dict:
        backbone = create_backbone("test_efficientnet", "random", num_classes=0)
        initialise_randomly(backbone, "test_efficientnet", seed)
        return backbone.model.state_dict()

    first, again, other = trunk(1), trunk(1), trunk(2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    images = LabelledImages([f"{i}.png" for i in range(40)], np.repeat(np.arange(2), 20))
    assert images.subset(0.25, 0).paths != images.subset(0.25, 1).paths


def arm(
    name: str,
    probe: float,
    curve: list[tuple[float, float]],
    test: float,
    seed: int = 0,
    fraction: float = 1.0,
) -> ArmRun:
    history = [{"epoch": 0, "seconds": 1.0, "val_accuracy": probe}] + [
        {"epoch": i + 1, "seconds": seconds, "val_accuracy": accuracy}
        for i, (seconds, accuracy) in enumerate(curve)
    ]
    best = max(a for _, a in curve)
    return ArmRun(
        name, fraction, int(100 * fraction), probe, best, test, curve[-1][0], history, seed
    )


def test_the_figures_come_from_the_curves():
    comparison = TransferComparison(
        [
            arm("transferred", 0.8, [(2.0, 0.85), (3.0, 0.92), (4.0, 0.95)], 0.94),
            arm("scratch", 0.3, [(2.5, 0.5), (3.5, 0.7), (4.5, 0.95)], 0.93),
        ],
        target_accuracy=0.9,
    )
    t, s = comparison.figures_of("transferred", 0), comparison.figures_of("scratch", 0)
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
    assert comparison.figures("transferred")["test_accuracy"] == Spread(
        0.94, 0.0, 0.94, 0.94, [0.94]
    )


def test_a_scratch_arm_that_is_as_good_is_not_called_behind():
    comparison = TransferComparison(
        [
            arm("transferred", 0.5, [(2.0, 0.6), (3.0, 0.8)], 0.8),
            arm("scratch", 0.5, [(2.0, 0.95), (3.0, 0.97)], 0.96),
        ],
        target_accuracy=0.9,
    )
    assert comparison.figures_of("transferred", 0).epochs_to_target is None
    assert comparison.ahead() == {
        "initial_skill": False,
        "rate_of_improvement": False,
        "converged_skill": False,
    }


def three_seeds() -> TransferComparison:
    """Transferred clearly ahead at first, narrowly ahead at the end (within the noise)."""
    runs = []
    for seed, (t_probe, s_probe, t_test, s_test) in enumerate(
        [(0.90, 0.70, 0.96, 0.97), (0.92, 0.72, 0.97, 0.93), (0.94, 0.74, 0.98, 0.95)]
    ):
        runs += [
            arm("transferred", t_probe, [(2.0, 0.95), (3.0, 0.96)], t_test, seed),
            arm("scratch", s_probe, [(2.0, 0.80), (3.0, 0.95 if seed else 0.85)], s_test, seed),
            arm("transferred", t_probe, [(2.0, 0.90)], t_test - 0.1, seed, fraction=0.5),
            arm("scratch", s_probe, [(2.0, 0.80)], s_test - 0.2, seed, fraction=0.5),
        ]
    return TransferComparison(runs, target_accuracy=0.95)


def test_each_figure_is_a_mean_with_its_spread_over_seeds():
    comparison = three_seeds()
    assert comparison.seeds == [0, 1, 2]
    t, s = comparison.figures("transferred"), comparison.figures("scratch")
    assert t["probe_val_accuracy"].mean == pytest.approx(0.92)
    assert t["probe_val_accuracy"].std == pytest.approx(0.02)  # sample std
    assert (t["probe_val_accuracy"].min, t["probe_val_accuracy"].max) == (0.90, 0.94)
    assert t["epochs_to_target"].values == [1.0, 1.0, 1.0]
    # Seed 0's scratch run never reaches 95%: its epochs count as the budget + 1 (3).
    assert s["epochs_to_target"].values == [3.0, 2.0, 2.0]
    assert s["epochs_to_target"].missing == 1
    assert s["seconds_to_target"].values == [3.0, 3.0]  # the runs that reached it
    assert t["test_accuracy"].mean == pytest.approx(0.97)
    assert s["test_accuracy"].mean == pytest.approx(0.95)
    leads = comparison.leads()
    assert leads["probe_val_accuracy"].lead == pytest.approx(0.2)
    assert leads["probe_val_accuracy"].exceeds_spread  # 0.2 > 0.02 + 0.02
    assert leads["probe_val_accuracy"].seeds_ahead == 3
    assert leads["epochs_to_target"].lead == pytest.approx(4 / 3)
    assert leads["test_accuracy"].lead == pytest.approx(0.02)
    assert not leads["test_accuracy"].exceeds_spread  # 0.02 < 0.01 + 0.02
    assert leads["test_accuracy"].seeds_ahead == 2  # seed 0: scratch better on test
    assert comparison.ahead() == {
        "initial_skill": True,
        "rate_of_improvement": True,
        "converged_skill": True,
    }
    assert comparison.beyond_spread() == {
        "initial_skill": True,
        "rate_of_improvement": True,
        "converged_skill": False,  # the test lead is within the spread
    }


def test_the_curves_and_the_data_efficiency_are_means_with_their_spread():
    comparison = three_seeds()
    scratch = comparison.curve("scratch")
    assert [r["epoch"] for r in scratch] == [0, 1, 2]
    assert scratch[2]["val_accuracy"] == pytest.approx((0.85 + 0.95 + 0.95) / 3)
    assert (scratch[2]["val_accuracy_min"], scratch[2]["val_accuracy_max"]) == (0.85, 0.95)
    assert scratch[2]["runs"] == 3
    half, full = comparison.data_efficiency()
    assert (half["fraction"], full["fraction"]) == (0.5, 1.0)
    assert half["transferred"] == pytest.approx(0.87)
    assert half["scratch"] == pytest.approx(0.75)
    assert half["scratch_std"] == pytest.approx(Spread.of([0.77, 0.73, 0.75]).std)
    assert half["exceeds_spread"] and not full["exceeds_spread"]


def test_converged_skill_needs_both_val_and_test_not_behind():
    # Ahead on final val accuracy but behind on test: not ahead.
    comparison = TransferComparison(
        [
            arm("transferred", 0.9, [(2.0, 0.99)], 0.90),
            arm("scratch", 0.5, [(2.0, 0.97)], 0.95),
        ],
        target_accuracy=0.95,
    )
    assert comparison.ahead()["converged_skill"] is False
    assert comparison.ahead()["initial_skill"] is True


@pytest.mark.slow
def test_on_the_whole_sample_the_transferred_model_is_ahead_on_all_three_benefits(
    tmp_path_factory,
):
    """The README's claim, from the default settings (params.yaml) on every sample digit."""
    defaults = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    overrides = {"data": defaults["data"], "pretrain": defaults["pretrain"]}
    overrides["transfer"] = defaults["transfer"]
    paths = make_project(
        tmp_path_factory.mktemp("transfer-sample") / "project", per_class=None, overrides=overrides
    )
    validate.main(paths.root)
    for command in ("pretrain", "transfer-report"):
        result = CliRunner().invoke(app, [command, "--root", str(paths.root)])
        assert result.exit_code == 0, result.output
    summary = read_json(paths.root / "reports" / "transfer.json")
    assert summary["context"]["images"] == {"train": 612, "val": 147, "test": 137}
    assert len(summary["seeds"]) == defaults["transfer"]["seeds"]
    assert summary["ahead"] == {
        "initial_skill": True,
        "rate_of_improvement": True,
        "converged_skill": True,
    }
