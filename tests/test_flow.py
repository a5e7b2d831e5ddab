"""The Prefect flow over the DVC pipeline: a real temporary Prefect server, real `dvc repro`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from graft.files import read_json
from graft.paths import ProjectPaths
from tests.conftest import REPO_ROOT, make_project

SCRIPTS = str(Path(sys.executable).parent)


def run(root: Path, *command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PATH": SCRIPTS + os.pathsep + os.environ["PATH"], **(env or {})}
    return subprocess.run(command, cwd=root, capture_output=True, text=True, env=environment)


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    result = run(root, sys.executable, "-m", "dvc", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def as_dvc_project(paths: ProjectPaths) -> ProjectPaths:
    """Give a project folder the repository's pipeline definition and code paths, under DVC."""
    shutil.copy(REPO_ROOT / "dvc.yaml", paths.root)
    shutil.copytree(
        REPO_ROOT / "src", paths.root / "src", ignore=shutil.ignore_patterns("__pycache__")
    )
    dvc(paths.root, "init", "--no-scm", "--quiet")
    dvc(paths.root, "config", "core.analytics", "false")
    return paths


def assert_dvc_has_nothing_to_do(root: Path) -> None:
    assert "Data and pipelines are up to date." in dvc(root, "status").stdout
    repro = dvc(root, "repro")
    assert "Running stage" not in repro.stdout, repro.stdout


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def latest_report() -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["graft-run-report"]))
        )
    assert artifacts, "the flow published no run report"
    return max(artifacts, key=lambda artifact: artifact.created).data


def test_flow_runs_every_stage_through_dvc_and_leaves_nothing_to_do(tmp_path, prefect_server):
    from flows.training import training

    paths = as_dvc_project(make_project(tmp_path / "project"))
    result = training(str(paths.root))
    assert result["outcome"] == "exported"
    assert paths.onnx_model.is_file()
    lock = yaml.safe_load((paths.root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {
        "validate",
        "features",
        "train_head",
        "finetune",
        "evaluate",
        "export",
    }
    assert_dvc_has_nothing_to_do(paths.root)
    report = latest_report()
    assert "graft training run: exported" in report
    assert "| head |" in report and "| finetuned |" in report and "parity" in report


def test_flow_stops_before_export_when_the_gate_fails(tmp_path, prefect_server):
    from flows.training import training

    overrides = {"evaluate": {"min_accuracy": 1.0}}
    paths = as_dvc_project(make_project(tmp_path / "project", overrides=overrides))
    result = training(str(paths.root))
    assert result["outcome"] == "refused"
    assert any("below the minimum" in reason for reason in result["reasons"])
    assert not paths.onnx_model.exists()
    assert "export" not in yaml.safe_load((paths.root / "dvc.lock").read_text())["stages"]
    report = latest_report()
    assert "graft training run: refused" in report and "below the minimum" in report
    # `dvc repro` respects the gate too: the export stage itself refuses.
    repro = run(paths.root, sys.executable, "-m", "dvc", "repro")
    assert repro.returncode != 0 and "not blessed" in repro.stdout + repro.stderr
    assert not paths.onnx_model.exists()


def test_a_failing_stage_fails_the_flow_and_names_the_stage(tmp_path, prefect_server):
    from flows.training import StageFailed, training

    paths = as_dvc_project(make_project(tmp_path / "project"))
    shutil.rmtree(paths.data / "3")
    for image in list((paths.data / "4").iterdir())[1:]:
        image.unlink()  # class 4 keeps one image: under data.min_images_per_class
    with pytest.raises(StageFailed, match="stage validate failed") as error:
        training(str(paths.root))
    assert "class '4'" in str(error.value)


@pytest.mark.slow
def test_make_run_trains_a_blessed_model_on_the_sample_offline(tmp_path):
    """The README's main job on a fresh copy: real weights, full sample, the committed data.dvc."""
    root = tmp_path / "clone"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml", "data.dvc", ".dvcignore"):
        shutil.copy(REPO_ROOT / name, root)
    shutil.copytree(
        REPO_ROOT / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp")
    )
    shutil.copytree(REPO_ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        REPO_ROOT / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__")
    )
    assert run(root, "git", "init", "--quiet").returncode == 0
    committed = (root / "data.dvc").read_text()
    assert run(root, "graft", "sample-data").returncode == 0
    dvc(root, "commit", "--force", "--quiet", "data.dvc")
    assert (root / "data.dvc").read_text() == committed, "sample bytes differ from data.dvc"

    env = {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": ""}
    flow = run(root, sys.executable, "flows/training.py", env=env)
    assert flow.returncode == 0, flow.stdout[-3000:] + flow.stderr[-3000:]
    assert "graft training flow: exported" in flow.stdout

    paths = ProjectPaths(root)
    evaluation = read_json(paths.metrics / "eval.json")
    assert evaluation["accuracy"] >= 0.95
    assert {"head", "finetuned"} <= set(evaluation)
    parity = read_json(paths.metrics / "export.json")["parity"]
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_logit_diff"] <= 1e-3
    assert parity["images"] == evaluation["test_images"] > 200
    assert paths.onnx_model.is_file()
    assert_dvc_has_nothing_to_do(root)
