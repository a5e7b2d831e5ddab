"""prefect.yaml's `gpu` work pool: fine-tuning deployed apart from the nightly flow, with the job
variables a GPU worker's flow runs get (a real Prefect server on 127.0.0.1, `prefect deploy`)."""

from __future__ import annotations

import shutil

import yaml

from tests.conftest import REPO_ROOT
from tests.test_deployment import stack  # noqa: F401  (the fixture: server, CLI, API)


def test_fine_tuning_deploys_to_the_gpu_pool_with_its_job_variables(tmp_path, stack):  # noqa: F811
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO_ROOT / "prefect.yaml", project)
    shutil.copytree(
        REPO_ROOT / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__")
    )
    for pool in ("graft", "gpu"):
        stack.cli("work-pool", "create", pool, "--type", "process", cwd=project)
    stack.cli("--no-prompt", "deploy", "--all", cwd=project)

    by_name = {d["name"]: d for d in stack.post("/deployments/filter", {})}
    assert by_name.keys() == {"nightly", "finetune-gpu"}
    gpu = by_name["finetune-gpu"]
    assert gpu["work_pool_name"] == "gpu"
    assert gpu["entrypoint"] == "flows/gpu.py:finetune"
    declared = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    (expected,) = [d for d in declared if d["name"] == "finetune-gpu"]
    assert gpu["job_variables"] == expected["work_pool"]["job_variables"]
    assert gpu["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert by_name["nightly"]["work_pool_name"] == "graft"
    flows = {f["id"]: f["name"] for f in stack.post("/flows/filter", {})}
    assert flows[gpu["flow_id"]] == "graft-finetune"
