"""Promotion to production and rollback on tiny projects, with the real `graft serve` check."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graft.config import load_params
from graft.files import file_sha256, read_json
from graft.paths import ProjectPaths
from graft.promotion import PromotionRefused, RollbackRefused, promote, rollback
from graft.stages import evaluate, export, features, finetune, train_head, validate
from tests.conftest import make_project, write_params

STAGES = (validate, features, train_head, finetune, evaluate, export)


def _exported(root: Path, overrides: dict | None = None) -> ProjectPaths:
    paths = make_project(root, overrides=overrides)
    for stage in STAGES:
        stage.main(paths.root)
    return paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> ProjectPaths:
    """A tiny project run through export: the challenger a user would promote."""
    return _exported(tmp_path_factory.mktemp("good") / "project")


@pytest.fixture(scope="module")
def underfit(tmp_path_factory) -> ProjectPaths:
    """The same data, but a head trained for one step and no fine-tuning: a worse model."""
    return _exported(
        tmp_path_factory.mktemp("bad") / "project",
        {"head": {"kind": "linear", "epochs": 1, "patience": 1}, "finetune": {"enabled": False}},
    )


@pytest.fixture
def project(exported, tmp_path) -> ProjectPaths:
    shutil.copytree(exported.root, tmp_path / "project")
    return ProjectPaths(tmp_path / "project")


def production(paths: ProjectPaths) -> Path:
    return paths.root / "models" / "production"


def _promote(paths: ProjectPaths, **kwargs):
    return promote(paths.root, load_params(paths.params), **kwargs)


def test_first_promotion_applies_value_gates_only_and_serves_the_exported_model(project):
    record = _promote(project)
    served = production(project) / "model.onnx"
    assert served.read_bytes() == project.onnx_model.read_bytes()
    assert record.promoted and record.champion_metrics is None and record.checks == []
    assert record.infra_check.passed and record.infra_check.images > 0
    assert record.infra_check.top1_agreement == 1.0
    saved = read_json(production(project) / "promotion.json")
    assert saved["model_sha256"] == file_sha256(served) and saved["blessing"]["passed"]
    assert (production(project) / "model_card.md").read_text() == project.model_card.read_text()
    assert "Nothing was in production" in (project.root / "reports" / "promotion.md").read_text()
    kept = read_json(production(project) / "versions.json")
    assert [entry["sha256"] for entry in kept] == [record.model_sha256]


def test_a_worse_challenger_is_refused_and_production_is_untouched(underfit, exported, tmp_path):
    paths = ProjectPaths(shutil.copytree(underfit.root, tmp_path / "project"))
    champion = production(paths) / "model.onnx"
    champion.parent.mkdir(parents=True)
    shutil.copyfile(exported.onnx_model, champion)  # the better model is in production
    good = read_json(exported.metrics / "eval.json")["accuracy"]
    bad = read_json(paths.metrics / "eval.json")["accuracy"]
    assert bad < good, "the underfit model should be worse for this test to mean anything"

    with pytest.raises(PromotionRefused, match="accuracy .* is below the production model"):
        _promote(paths)
    assert champion.read_bytes() == exported.onnx_model.read_bytes()
    report = (paths.root / "reports" / "promotion.md").read_text()
    assert "REFUSED" in report and "accuracy_vs_production" in report
    assert not list(champion.parent.glob(".*.tmp"))

    with pytest.raises(PromotionRefused, match="needs a reason"):
        _promote(paths, force=True)
    record = _promote(paths, force=True, reason="the new labelling guide; see ticket 42")
    assert record.promoted and record.forced
    assert champion.read_bytes() == paths.onnx_model.read_bytes()
    saved = read_json(champion.parent / "promotion.json")
    assert saved["forced"] and saved["reason"] == "the new labelling guide; see ticket 42"
    assert saved["blessing"]["forced"] and "below the production model" in saved["reasons"][0]
    assert "PROMOTED BY FORCE" in (paths.root / "reports" / "promotion.md").read_text()
    history = [json.loads(line) for line in (champion.parent / "history.jsonl").open()]
    assert history[-1]["forced"] and history[-1]["reason"].startswith("the new labelling")


def test_rollback_restores_the_previous_model_and_its_record(project, underfit):
    first = _promote(project)
    with pytest.raises(RollbackRefused, match="no earlier version"):
        rollback(project.root, load_params(project.params))
    # A second promotion of a different export makes the first one the previous model.
    shutil.copyfile(underfit.onnx_model, project.onnx_model)
    shutil.copyfile(underfit.metrics / "export.json", project.metrics / "export.json")
    shutil.copyfile(underfit.blessing, project.blessing)
    second = _promote(project, force=True, reason="testing rollback")
    served = production(project) / "model.onnx"
    assert file_sha256(served) == second.model_sha256 != first.model_sha256

    restored = rollback(project.root, load_params(project.params))
    assert restored == first.model_sha256 == file_sha256(served)
    assert read_json(production(project) / "promotion.json")["model_sha256"] == first.model_sha256
    kept = read_json(production(project) / "versions.json")
    assert [entry["sha256"] for entry in kept] == [first.model_sha256, second.model_sha256]
    history = (production(project) / "history.jsonl").read_text().splitlines()
    actions = [json.loads(line)["action"] for line in history]
    assert actions == ["promote", "promote", "rollback"]


def test_a_failed_infra_check_blocks_promotion(project):
    params = load_params(project.params)
    settings = params.promote.model_copy(update={"infra_check_timeout_s": 0.01})
    with pytest.raises(PromotionRefused, match="infra check failed.*did not become ready"):
        promote(project.root, params.model_copy(update={"promote": settings}))
    assert not (production(project) / "model.onnx").exists()
    assert not list(production(project).glob(".*.tmp"))
    assert "**failed**" in (project.root / "reports" / "promotion.md").read_text()


def test_a_failing_value_gate_blocks_promotion(project):
    write_params(project.root, {"evaluate": {"min_accuracy": 1.0}})
    evaluate.main(project.root)  # the new blessing fails; the old export is still on disk
    with pytest.raises(PromotionRefused, match="not the export of the current blessing"):
        _promote(project)
    assert not (production(project) / "model.onnx").exists()


def test_an_export_that_is_not_the_current_blessing_is_refused(project):
    blessing = read_json(project.blessing)
    project.blessing.write_text(json.dumps(dict(blessing, reasons=["edited after export"])))
    with pytest.raises(PromotionRefused, match="not the export of the current blessing"):
        _promote(project)
    assert not (production(project) / "model.onnx").exists()


def test_a_promotion_killed_half_way_leaves_the_old_model_serving(project, underfit):
    champion = production(project) / "model.onnx"
    champion.parent.mkdir(parents=True)
    shutil.copyfile(underfit.onnx_model, champion)
    old = champion.read_bytes()
    lenient = {"max_accuracy_drop": 1.0, "max_class_recall_drop": 1.0}
    write_params(project.root, {"evaluate": lenient})  # the change gates let it through
    promoting = subprocess.Popen(
        [sys.executable, "-m", "graft", "promote", "--root", str(project.root)],
        start_new_session=True,  # its server too: the whole group is killed
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(champion.parent.glob(".model.onnx.*.tmp")):  # the infra check is under way
        assert promoting.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(promoting.pid, signal.SIGKILL)
    promoting.wait()
    assert champion.read_bytes() == old

    record = _promote(project)  # the next promotion cleans up and succeeds
    assert record.promoted and champion.read_bytes() == project.onnx_model.read_bytes()
    assert not list(champion.parent.glob(".*.tmp"))
