"""Versioning with DVC in a real git repository: push to a local remote, clone, pull, experiments.

The projects use the repository's own dvc.yaml, .gitignore and code with tiny params (12 digits
per class), so a file the repository forgets to version makes the clone differ.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, make_project
from tests.test_flow import dvc, run

GIT_IDENTITY = ("-c", "user.name=graft tests", "-c", "user.email=tests@graft.invalid")
# Everything the pipeline writes or versions: data (DVC), cached outs (DVC), metrics and plots
# (git: `cache: false` in dvc.yaml).
VERSIONED = ("data", "artifacts", "models", "reports", "metrics", "plots")


def git(root: Path, *args: str) -> str:
    result = run(root, "git", *GIT_IDENTITY, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def tree_digest(root: Path) -> dict[str, str]:
    """Every versioned file under ``root`` with its content hash."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in VERSIONED
        for path in sorted((root / folder).rglob("*"))
        if path.is_file()
    }


# Every pipeline file of the repository: a clone must come back clean with all of them.
PIPELINES = sorted(
    path.relative_to(REPO_ROOT)
    for path in REPO_ROOT.glob("**/dvc.yaml")
    if not {".venv", ".venv-serve", "site-packages"} & set(path.parts)
)
# The transfer study (transfer/dvc.yaml) on the tiny sample: seconds, not minutes.
TINY_TRANSFER = {
    "pretrain": {"training": {"epochs": 1, "batch_size": 16}},
    "transfer": {"fractions": [0.5, 1.0], "seeds": 1, "training": {"epochs": 1}},
}


def committed_project(root: Path, remote: Path, *, stages: tuple[str, ...] | None) -> Path:
    """A git + DVC project with every pipeline file of the repository (only the root
    pipeline's ``stages``, if given), data added with `dvc add`, every pipeline run and
    everything committed."""
    make_project(root, overrides=TINY_TRANSFER)
    for name in (".gitignore", ".dvcignore"):
        shutil.copy(REPO_ROOT / name, root)
    for file in PIPELINES:
        pipeline = yaml.safe_load((REPO_ROOT / file).read_text())
        if stages is not None:
            if file != Path("dvc.yaml"):
                continue
            pipeline["stages"] = {name: pipeline["stages"][name] for name in stages}
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        (root / file).write_text(yaml.safe_dump(pipeline, sort_keys=False))
    shutil.copytree(REPO_ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    git(root, "init", "--quiet")
    dvc(root, "init", "--quiet")
    dvc(root, "config", "core.analytics", "false")
    # What `make env` does on a checkout without a remote: a local one, in .dvc/config.local.
    dvc(root, "remote", "add", "--local", "-d", "local", str(remote))
    dvc(root, "add", "--quiet", "data")
    dvc(root, "repro", "--quiet", "--all-pipelines")
    git(root, "add", "--all")
    git(root, "commit", "--quiet", "-m", "pipeline on the tiny sample")
    return root


def assert_a_fresh_clone_pulls_everything_back(origin: Path, remote: Path) -> dict[str, str]:
    dvc(origin, "push", "--quiet")
    clone = origin.parent / "clone"
    git(origin.parent, "clone", "--quiet", str(origin), str(clone))
    assert not (clone / "data").exists() and not (clone / "artifacts" / "manifest.csv").exists()
    dvc(clone, "remote", "add", "--local", "-d", "local", str(remote))

    dvc(clone, "pull", "--quiet")

    assert "Data and pipelines are up to date." in dvc(clone, "status").stdout
    pulled = tree_digest(clone)
    assert pulled == tree_digest(origin)
    return pulled


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project with the validate stage only: seconds, where the whole pipeline takes
    minutes (that one is the slow test below)."""
    base = tmp_path_factory.mktemp("versioning")
    return committed_project(base / "origin", base / "remote", stages=("validate",))


def test_push_then_a_fresh_clone_pulls_the_data_and_validation_back(validated: Path) -> None:
    pulled = assert_a_fresh_clone_pulls_everything_back(validated, validated.parent / "remote")

    assert {
        "artifacts/manifest.csv",
        "artifacts/data_profile.json",
        "reports/validation/summary.json",
        "reports/validation/data_docs/index.html",
        "metrics/validation.json",
        "data/0/digit_0000.png",
    } <= set(pulled)


def test_an_experiment_with_a_changed_parameter_shows_in_exp_show(validated: Path) -> None:
    dvc(validated, "exp", "run", "--temp", "--quiet", "-n", "splits-7", "-S", "data.seed=7")

    table = json.loads(dvc(validated, "exp", "show", "--json").stdout)

    runs = {
        run["name"]: run["data"]
        for row in table
        for experiment in row.get("experiments") or []
        for run in experiment["revs"]
    }
    baseline = next(row["data"] for row in table if row["rev"] != "workspace")
    experiment = runs["splits-7"]
    params = experiment["params"]["params.yaml"]["data"]["data"]
    metrics = experiment["metrics"]["metrics/validation.json"]["data"]
    before = baseline["metrics"]["metrics/validation.json"]["data"]
    assert params["seed"] == 7
    assert baseline["params"]["params.yaml"]["data"]["data"]["seed"] == 42
    assert metrics["images"] == before["images"] == 120
    assert (metrics["train"], metrics["val"]) != (before["train"], before["val"])
    assert "data:\n  seed: 42" in (validated / "params.yaml").read_text()  # workspace untouched


def test_every_pipeline_file_of_the_repository_is_versioned_here():
    assert {str(path) for path in PIPELINES} >= {"dvc.yaml", "transfer/dvc.yaml"}


@pytest.mark.slow
def test_every_pipeline_comes_back_from_the_remote(tmp_path: Path) -> None:
    origin = committed_project(tmp_path / "origin", tmp_path / "remote", stages=None)
    # The transfer study's outs travel with git: `make run` never produces them, so a remote
    # that only a training run filled must not be needed to get them back.
    committed = git(origin, "ls-files").split()
    assert {"reports/transfer.md", "models/source/backbone.safetensors"} <= set(committed)

    pulled = assert_a_fresh_clone_pulls_everything_back(origin, tmp_path / "remote")

    assert {"models/model.onnx", "models/head.pt", "metrics/eval.json"} <= set(pulled)
    assert {"reports/transfer.json", "artifacts/source/manifest.csv"} <= set(pulled)
