"""The DVC-native model registry (GTO tags) across two clones, as on two hosts.

A training clone promotes (registers and assigns ``prod``), pushes its tags and DVC data; a
serving clone learns which version is in ``prod`` (``gto show``), fetches its bytes by stage
(``dvc artifacts get``) and serves them. A rollback moves ``prod`` back, and the serving side
follows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from graft.registry import (
    ARTIFACT,
    RegistryError,
    assign_production,
    production_version,
    record_production,
    register_production,
)
from graft.serving.app import create_app
from graft.serving.server import ServeSettings
from tests.fixtures.serving.server import DIGITS_MODEL, FIVE_MODEL

pytestmark = pytest.mark.timeout(300)
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

DVC_YAML = """\
stages:
  export:
    cmd: cp source/model.onnx models/model.onnx
    deps:
      - source/model.onnx
    outs:
      - models/model.onnx
artifacts:
  model:
    path: models/model.onnx
    type: model
    desc: the exported classifier (ONNX, labels and preprocessing in its metadata)
    labels: [onnx, image-classification]
"""


def run(cwd: Path, *command: str) -> str:
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, f"{command}: {result.stdout}\n{result.stderr}"
    return result.stdout.strip()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export(project: Path, model: Path, message: str) -> None:
    """What `dvc repro` + commit + push do in the real project, on a one-stage pipeline."""
    shutil.copyfile(model, project / "source" / "model.onnx")
    run(project, "dvc", "repro", "--quiet")
    run(project, "dvc", "push", "--quiet")
    run(project, "git", "add", "dvc.lock", "source/model.onnx")
    run(project, "git", "commit", "--quiet", "-m", message)
    run(project, "git", "push", "--quiet", "origin", "HEAD")


def push_tags(project: Path) -> None:
    run(project, "git", "push", "--quiet", "origin", "--tags")


def fetch_prod(origin: Path, dest: Path) -> Path:
    """The serving host: the model in prod, by stage, from the git remote and DVC remote."""
    out = dest / "model.onnx"
    out.unlink(missing_ok=True)
    run(dest, "dvc", "artifacts", "get", str(origin), ARTIFACT, "--stage", "prod", "-o", str(out))
    return out


@pytest.fixture
def hosts(tmp_path: Path) -> tuple[Path, Path, Path]:
    origin, remote, train = tmp_path / "origin.git", tmp_path / "dvc-remote", tmp_path / "train"
    run(tmp_path, "git", "init", "--quiet", "--bare", str(origin))
    run(tmp_path, "git", "clone", "--quiet", str(origin), str(train))
    run(train, "git", "config", "user.name", "graft test")
    run(train, "git", "config", "user.email", "test@graft.invalid")
    run(train, "dvc", "init", "--quiet")
    run(train, "dvc", "config", "core.analytics", "false")
    run(train, "dvc", "remote", "add", "--default", "local", str(remote))
    (train / "dvc.yaml").write_text(DVC_YAML)
    (train / "source").mkdir()
    (train / "models").mkdir()
    run(train, "git", "add", ".")
    run(train, "git", "commit", "--quiet", "-m", "project")
    serve = tmp_path / "serve"
    serve.mkdir()
    return origin, train, serve


def test_promote_in_one_clone_fetch_by_stage_and_serve_in_another(hosts):
    origin, train, serve = hosts
    export(train, DIGITS_MODEL, "export digits")
    first = register_production(train, train / "models" / "model.onnx", "first promotion")
    assert first.registered and first.version_tag == f"{ARTIFACT}@{first.version}"
    assert first.stage_tag.startswith(f"{ARTIFACT}#prod#")
    assert first.commit == run(train, "git", "rev-parse", "HEAD")
    push_tags(train)
    assert sha256(fetch_prod(origin, serve)) == sha256(DIGITS_MODEL)

    time.sleep(1.1)  # GTO orders assignments by their tags' time, to the second
    export(train, FIVE_MODEL, "export five")
    second = register_production(train, train / "models" / "model.onnx", "second promotion")
    assert second.version != first.version and production_version(train) == second.version
    push_tags(train)
    shown = run(serve, "gto", "show", f"{ARTIFACT}#prod", "--repo", str(origin), "--version")
    assert shown == second.version
    fetched = fetch_prod(origin, serve)
    assert sha256(fetched) == sha256(FIVE_MODEL)
    with TestClient(create_app(ServeSettings(str(fetched), reload_interval_s=0))) as http:
        assert http.get("/readyz").json()["model"]["sha256"] == sha256(FIVE_MODEL)
        assert len(http.get("/metadata").json()["labels"]) == 5

    time.sleep(1.1)
    restored = train / "restored.onnx"  # what rollback puts back in production
    shutil.copyfile(DIGITS_MODEL, restored)
    rolled_back = record_production(train, restored, "rollback")  # graft rollback's hook
    assert rolled_back.stage_tag not in (first.stage_tag, second.stage_tag)
    assert production_version(train) == first.version
    push_tags(train)
    assert sha256(fetch_prod(origin, serve)) == sha256(DIGITS_MODEL)


def test_nothing_is_registered_unless_head_records_the_promoted_file(hosts, tmp_path):
    _, train, _ = hosts
    export(train, DIGITS_MODEL, "export digits")
    shutil.copyfile(FIVE_MODEL, train / "models" / "model.onnx")  # not what HEAD records
    entry = register_production(train, train / "models" / "model.onnx")
    assert not entry.registered and "dvc.lock" in entry.skipped
    assert run(train, "git", "tag") == ""
    outside = tmp_path / "not-git"
    outside.mkdir()
    assert register_production(outside, DIGITS_MODEL).skipped == "not a git repository"
    with pytest.raises(RegistryError, match="not registered"):
        assign_production(train, "v9.9.9")


def test_the_promote_hook_names_the_tags_in_the_record_and_adds_none_on_a_re_promotion(
    hosts, capsys
):
    from graft.cli import _record_in_registry

    _, train, _ = hosts
    (train / "params.yaml").write_text("{}\n")  # every default: production in models/production
    export(train, DIGITS_MODEL, "export digits")
    production = train / "models" / "production"
    production.mkdir()
    shutil.copyfile(train / "models" / "model.onnx", production / "model.onnx")
    (production / "promotion.json").write_text('{"promoted": true}')
    _record_in_registry(train, "promote")
    record = json.loads((production / "promotion.json").read_text())
    assert record["promoted"] is True  # the record is kept, the registry added
    entry = record["registry"]
    assert entry["registered"] and entry["stage_tag"] in run(train, "git", "tag").split()
    assert production_version(train) == entry["version"]
    assert f"{entry['version_tag']} is in prod" in capsys.readouterr().out
    tags = run(train, "git", "tag")
    _record_in_registry(train, "promote")  # the same model again: prod already points at it
    assert run(train, "git", "tag") == tags
    assert json.loads((production / "promotion.json").read_text())["registry"] == entry
