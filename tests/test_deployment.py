"""The scheduled deployment as a user runs it: a real Prefect server on 127.0.0.1, a process work
pool, `prefect deploy` from prefect.yaml, a worker, and runs triggered through the API."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO_ROOT, make_project
from tests.test_flow import as_dvc_project, assert_dvc_has_nothing_to_do, dvc

SCRIPTS = Path(sys.executable).parent
DEPLOYMENT = "graft-training/nightly"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrefectStack:
    """`prefect server start` and `prefect worker start` as subprocesses, stopped at the end."""

    def __init__(self, home: Path) -> None:
        port = _free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        self.env = {
            **os.environ,
            "PATH": str(SCRIPTS) + os.pathsep + os.environ["PATH"],
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }
        self.logs = home / "logs"
        self.logs.mkdir(parents=True)
        self.processes: list[subprocess.Popen] = []
        self.start("server", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port)
        self.wait_healthy()

    def start(self, name: str, *command, cwd: Path | None = None) -> None:
        log = (self.logs / f"{name}.log").open("w")
        self.processes.append(
            subprocess.Popen(
                [str(part) for part in command],
                cwd=cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def cli(self, *args: str, cwd: Path) -> str:
        result = subprocess.run(
            ["prefect", *args], cwd=cwd, env=self.env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def wait_healthy(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("the Prefect server did not start:\n" + self.log("server"))

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()[-5000:]

    def post(self, path: str, payload: dict) -> object:
        response = httpx.post(f"{self.api}{path}", json=payload, timeout=30)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


@pytest.fixture
def stack(tmp_path):
    prefect = PrefectStack(tmp_path / "prefect-home")
    yield prefect
    prefect.stop()


@pytest.mark.slow
def test_deployed_flow_runs_on_a_worker_without_overlapping_and_leaves_dvc_clean(tmp_path, stack):
    paths = as_dvc_project(make_project(tmp_path / "project"))
    for name in ("prefect.yaml",):
        shutil.copy(REPO_ROOT / name, paths.root)
    shutil.copytree(
        REPO_ROOT / "flows", paths.root / "flows", ignore=shutil.ignore_patterns("__pycache__")
    )
    remote = tmp_path / "dvc-remote"
    dvc(paths.root, "remote", "add", "--local", "--default", "local", str(remote))

    for pool in ("graft", "gpu"):  # gpu: prefect.yaml's fine-tuning deployment (test_work_pools)
        stack.cli("work-pool", "create", pool, "--type", "process", cwd=paths.root)
    stack.cli("--no-prompt", "deploy", "--all", cwd=paths.root)
    (deployment,) = [d for d in stack.post("/deployments/filter", {}) if d["name"] == "nightly"]
    assert deployment["name"] == "nightly" and deployment["work_pool_name"] == "graft"
    (schedule,) = deployment["schedules"]
    assert schedule["schedule"]["cron"] == "0 3 * * *"
    assert schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert deployment["global_concurrency_limit"]["limit"] == 1

    # The worker may take two runs at once: only the deployment's limit keeps them apart.
    stack.start("worker", "prefect", "worker", "start", "--pool", "graft", "--limit", "2")
    run_ids = [
        stack.post(f"/deployments/{deployment['id']}/create_flow_run", {})["id"] for _ in range(2)
    ]
    deadline = time.monotonic() + 900
    while True:
        runs = stack.post("/flow_runs/filter", {"flow_runs": {"id": {"any_": run_ids}}})
        if all(run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED") for run in runs):
            break
        assert time.monotonic() < deadline, stack.log("worker")
        time.sleep(2)

    runs = sorted(runs, key=lambda run: run["start_time"])
    for run in runs:
        assert run["state"]["name"] == "Promoted", (run["state"], stack.log("worker"))
    first, second = runs
    assert second["start_time"] >= first["end_time"], "two runs of the deployment overlapped"

    for run in runs:
        artifacts = stack.post(
            "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
        )
        (report,) = [artifact for artifact in artifacts if artifact["key"] == "graft-run-report"]
        assert report["data"].startswith("# graft training run: Promoted")
    assert (paths.root / "models" / "production" / "model.onnx").is_file()
    assert_dvc_has_nothing_to_do(paths.root)
    assert "in sync" in dvc(paths.root, "status", "--cloud").stdout  # everything was pushed
    lock = yaml.safe_load((paths.root / "dvc.lock").read_text())
    assert set(lock["stages"]) >= {"validate", "export"}
