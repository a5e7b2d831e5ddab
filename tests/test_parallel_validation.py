"""Validation over every core, or a Dask cluster (a scheduler and two workers started here):
the same manifest as checking the files in one process, whichever runs it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from graft.config import DataParams, load_params
from graft.data.manifest import build_manifest, read_manifest
from graft.parallel import CHUNK, ClusterUnreachable, map_in_processes
from graft.paths import ProjectPaths
from graft.stages import validate as validate_stage
from tests.conftest import data_unchanged, make_project

PER_CLASS = CHUNK // 10 + 8  # more files than one chunk: the work is split between workers


def add_bad_files(data: Path) -> None:
    (data / "3" / "empty.png").write_bytes(b"")
    (data / "7" / "text.jpg").write_bytes(b"not an image")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> ProjectPaths:
    paths = make_project(tmp_path_factory.mktemp("parallel") / "project", per_class=PER_CLASS)
    add_bad_files(paths.data)
    return paths


@pytest.fixture(scope="module")
def in_one_process(project) -> pd.DataFrame:
    return build_manifest(project.data, DataParams(), map_images=map)


def test_two_processes_give_the_manifest_of_one(project, in_one_process):
    with data_unchanged(project.data):
        manifest = build_manifest(
            project.data,
            DataParams(),
            map_images=lambda f, items: map_in_processes(f, items, workers=2),
        )
    assert len(manifest) == 10 * PER_CLASS + 2 > CHUNK
    assert set(manifest.loc[manifest.status != "ok", "reason"]) == {"empty", "not_an_image"}
    pd.testing.assert_frame_equal(manifest, in_one_process)


def test_the_validate_stage_on_two_local_processes_writes_the_manifest_of_one(
    tmp_path, monkeypatch
):
    # Two cores: files checked in a pool of 2 processes, the suite built on a thread meanwhile.
    monkeypatch.setattr("graft.parallel.local_cores", lambda: 2)
    paths = make_project(tmp_path / "project", per_class=PER_CLASS)
    add_bad_files(paths.data)
    with data_unchanged(paths.data):
        result = validate_stage.main(paths.root)
    assert result.summary["expectations"]["success"]
    assert result.summary["expectations"]["evaluated"] > 20
    assert (paths.validation_reports / "data_docs" / "index.html").is_file()
    one_process = build_manifest(paths.data, load_params(paths.params).data, map_images=map)
    pd.testing.assert_frame_equal(read_manifest(paths.manifest), one_process)


def test_the_validate_stage_runs_on_the_dask_scheduler_params_name(project, in_one_process):
    from dask.distributed import Client, LocalCluster

    params = yaml.safe_load(project.params.read_text())
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        params["features"]["dask_scheduler"] = cluster.scheduler_address
        project.params.write_text(yaml.safe_dump(params, sort_keys=False))
        with data_unchanged(project.data):
            validate_stage.main(project.root)
        with Client(cluster) as client:
            tasks_per_worker = client.run(_tasks_run_here)
    assert len(tasks_per_worker) == 2
    assert all(count > 0 for count in tasks_per_worker.values()), tasks_per_worker
    written = read_manifest(project.manifest)
    assert written["path"].tolist() == in_one_process["path"].tolist()
    assert written["sha256"].tolist() == in_one_process["sha256"].tolist()
    assert written["status"].tolist() == in_one_process["status"].tolist()


def _tasks_run_here(dask_worker) -> int:
    return sum(1 for key in dask_worker.state.log if "_apply" in str(key))


def test_an_unreachable_scheduler_is_an_error_naming_the_key(tmp_path):
    paths = make_project(tmp_path / "project", per_class=6)
    params = yaml.safe_load(paths.params.read_text())
    params["features"]["dask_scheduler"] = "tcp://127.0.0.1:9"
    paths.params.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ClusterUnreachable, match="features.dask_scheduler"):
        validate_stage.main(paths.root)
    assert not paths.manifest.exists()
