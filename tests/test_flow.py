"""The Prefect flow over the DVC pipeline: a real temporary Prefect server, real `dvc repro`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from graft.errors import ExitCode
from graft.files import read_json
from graft.paths import ProjectPaths
from tests.conftest import REPO_ROOT, data_unchanged, make_project, write_params

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


class WebhookReceiver:
    """A real HTTP endpoint on 127.0.0.1 that records what a notification block posts to it."""

    def __init__(self) -> None:
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                received.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def block_name(self) -> str:
        """Save a Prefect custom-webhook notification block pointing here; its slug/name."""
        from prefect.blocks.notifications import CustomWebhookNotificationBlock

        block = CustomWebhookNotificationBlock(
            name="graft test alerts", url=self.url, json_data={"text": "{{subject}}\n{{body}}"}
        )
        name = f"graft-test-{self.server.server_address[1]}"
        block.save(name, overwrite=True)
        return f"{block.get_block_type_slug()}/{name}"


@pytest.fixture
def webhook(prefect_server):
    receiver = WebhookReceiver()
    yield receiver
    receiver.server.shutdown()


def final_state(paths: ProjectPaths, **parameters):
    from flows.training import training

    return training(str(paths.root), return_state=True, **parameters)


@pytest.fixture(scope="module")
def promoted_project(tmp_path_factory, prefect_server) -> tuple[ProjectPaths, object]:
    paths = as_dvc_project(make_project(tmp_path_factory.mktemp("flow") / "project"))
    return paths, final_state(paths)


def test_flow_runs_every_stage_through_dvc_promotes_and_leaves_nothing_to_do(promoted_project):
    paths, state = promoted_project
    assert state.is_completed() and state.name == "Promoted", state.message
    assert state.result()["outcome"] == "promoted"
    served = paths.root / "models" / "production" / "model.onnx"
    assert served.read_bytes() == paths.onnx_model.read_bytes()
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
    assert "graft training run: Promoted" in report
    assert "| head |" in report and "| finetuned |" in report and "parity" in report
    assert "Infra check (`graft serve` on loopback): passed" in report


def copy_of(project: ProjectPaths, dest: Path) -> ProjectPaths:
    """A copy of a DVC project that has run (its cache, lock and production folder included)."""
    return ProjectPaths(shutil.copytree(project.root, dest, symlinks=True))


def test_a_gate_refusal_is_its_own_outcome_and_notifies(promoted_project, tmp_path, webhook):
    paths = copy_of(promoted_project[0], tmp_path / "project")
    production = paths.root / "models" / "production" / "model.onnx"
    before = production.read_bytes()
    overrides = {"evaluate": {"min_accuracy": 1.0}, "flow": {"notify_block": webhook.block_name()}}
    write_params(paths.root, overrides)
    state = final_state(paths)
    assert state.is_completed() and state.name == "Refused"
    assert "below the minimum" in state.message
    assert production.read_bytes() == before  # a refusal never touches production
    report = latest_report()
    assert "graft training run: Refused" in report and "below the minimum" in report
    assert "Stages run (DVC skips those already up to date): validate" in report
    assert len(webhook.received) == 1 and "Refused" in webhook.received[0]
    assert "below the minimum" in webhook.received[0]
    # `dvc repro` respects the gate too: the export stage itself refuses.
    repro = run(paths.root, sys.executable, "-m", "dvc", "repro")
    assert repro.returncode != 0 and "not blessed" in repro.stdout + repro.stderr
    assert production.read_bytes() == before


def test_a_failing_stage_fails_the_run_names_the_stage_and_notifies(tmp_path, webhook):
    overrides = {"flow": {"notify_block": webhook.block_name()}}
    paths = as_dvc_project(make_project(tmp_path / "project", overrides=overrides))
    shutil.rmtree(paths.data / "3")
    for image in list((paths.data / "4").iterdir())[1:]:
        image.unlink()  # class 4 keeps one image: under data.min_images_per_class
    state = final_state(paths)
    assert state.is_failed()
    assert "stage validate failed" in state.message and "class '4'" in state.message
    report = latest_report()
    assert "graft training run: Failed" in report and "failed at validate" in report
    assert len(webhook.received) == 1 and "stage validate failed" in webhook.received[0]


def test_a_stage_that_refused_or_found_bad_input_gives_the_flow_that_exit_code():
    from flows.training import _graft_exit_code

    said = "ERROR: failed to reproduce '{}': failed to run: graft {}, exited with {}"
    assert _graft_exit_code(said.format("export", "export", 3)) == ExitCode.REFUSED
    assert _graft_exit_code(said.format("validate", "validate", 4)) == ExitCode.BAD_INPUT
    assert _graft_exit_code(said.format("finetune", "finetune", 1)) == ExitCode.FAILED
    assert _graft_exit_code(said.format("features", "features", -9)) == ExitCode.FAILED
    assert _graft_exit_code("ERROR: unexpected error - Permission denied") == ExitCode.FAILED


def test_a_stage_past_its_time_limit_is_stopped_and_a_rerun_redoes_only_what_is_stale(
    promoted_project, tmp_path
):
    paths = copy_of(promoted_project[0], tmp_path / "project")
    embedded = (paths.features / "train.npz").stat().st_mtime_ns
    slow = {"finetune": {"seed": 7}, "flow": {"stage_timeouts_s": {"finetune": 1}}}
    write_params(paths.root, slow)  # a new seed makes finetune and what follows it stale
    state = final_state(paths)
    assert state.is_failed() and "stage finetune ran past its time limit of 1 s" in state.message
    assert "failed at finetune" in latest_report()

    write_params(paths.root, {"finetune": {"seed": 7}})
    state = final_state(paths)
    assert state.name == "Promoted", state.message
    assert (paths.features / "train.npz").stat().st_mtime_ns == embedded  # not re-run
    assert yaml.safe_load((paths.root / "dvc.lock").read_text())["stages"]["finetune"]
    assert_dvc_has_nothing_to_do(paths.root)


def test_a_transient_dvc_push_failure_is_retried(promoted_project, tmp_path):
    import threading
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    paths = copy_of(promoted_project[0], tmp_path / "project")
    blocker = tmp_path / "storage"
    blocker.write_text("not a folder yet")  # the remote below cannot be created: push fails
    dvc(paths.root, "remote", "add", "--local", "--default", "flaky", str(blocker / "remote"))

    def storage_comes_back():  # once the first push has failed and waits for its retry
        from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

        only_push = TaskRunFilter(name=TaskRunFilterName(any_=["dvc push"]))
        deadline = time.monotonic() + 600
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                runs = client.read_task_runs(task_run_filter=only_push)
                if any(run.state and run.state.name == "AwaitingRetry" for run in runs):
                    break
                time.sleep(0.2)
        blocker.unlink()
        blocker.mkdir()

    threading.Thread(target=storage_comes_back, daemon=True).start()
    state = final_state(paths)
    assert state.name == "Promoted", state.message
    assert any((blocker / "remote").rglob("*")), "nothing reached the remote"
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    push = next(run for run in runs if run.name == "dvc push")
    assert push.run_count >= 2 and push.state.is_completed()
    pull = next(run for run in runs if run.name == "dvc pull")
    assert pull.run_count == 1


def test_the_flow_never_pulls_over_changed_data_and_records_it_when_asked(
    promoted_project, tmp_path
):
    from PIL import Image

    from graft.data.manifest import read_manifest

    paths = copy_of(promoted_project[0], tmp_path / "project")
    dvc(paths.root, "add", "--quiet", "data")
    dvc(paths.root, "remote", "add", "--local", "--default", "local", str(tmp_path / "remote"))
    dvc(paths.root, "push", "--quiet")  # dvc pull could now check the recorded version out
    data = paths.data
    (data / "1" / "digit_0001.png").rename(data / "7" / "digit_0001.png")  # a relabel
    with Image.open(data / "3" / "digit_0003.png") as image:
        image.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(data / "3" / "new.png")
    (data / "4" / "digit_0004.png").unlink()

    env = {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": "",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",  # as `make run` allows
    }
    with data_unchanged(data):
        script = REPO_ROOT / "flows" / "training.py"
        flow = run(paths.root, sys.executable, str(script), str(paths.root), env=env)
    assert flow.returncode == ExitCode.BAD_INPUT, flow.stdout[-3000:] + flow.stderr[-3000:]
    said = " ".join((flow.stdout + flow.stderr).split())
    assert "moved: data/1/digit_0001.png -> data/7/digit_0001.png" in said
    assert "added: data/3/new.png" in said and "deleted: data/4/digit_0004.png" in said
    assert "`graft check-data --record`" in said and "flow.record_data: true" in said

    write_params(paths.root, {"flow": {"record_data": True}})
    with data_unchanged(data):
        state = final_state(paths, promote=False)
    assert state.name == "Exported", state.message
    manifest = read_manifest(paths.manifest).set_index("path")
    assert manifest.loc["7/digit_0001.png", "label"] == "7"  # trained on the new labels
    assert "3/new.png" in manifest.index and "4/digit_0004.png" not in manifest.index
    assert "1/digit_0001.png" not in manifest.index
    assert "data.dvc" not in dvc(paths.root, "status").stdout  # recorded


@pytest.mark.slow
@pytest.mark.longest
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
    assert "graft training flow: promoted" in flow.stdout

    paths = ProjectPaths(root)
    evaluation = read_json(paths.metrics / "eval.json")
    assert evaluation["candidate"] == "finetuned"  # chosen on val
    assert evaluation["finetuned"]["accuracy"] >= 0.98
    assert evaluation["finetuned"]["accuracy"] > evaluation["head"]["accuracy"]
    assert {"head", "finetuned"} <= set(evaluation)
    # Label smoothing left the fine-tuned model underconfident; the temperature fitted on val
    # fixes that on val, and on test too.
    calibration = read_json(paths.metrics / "finetune.json")["calibration"]
    assert calibration["temperature"] < 1.0
    assert calibration["val_ece"] < calibration["val_ece_before"] / 2
    assert evaluation["finetuned"]["ece"] < 0.05
    exported = read_json(paths.metrics / "export.json")
    parity = exported["parity"]
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_logit_diff"] <= 1e-4
    assert parity["images"] == evaluation["test_images"] > 200
    int8 = exported["int8"]  # on the digits INT8 loses many points: the gate decides, visibly
    within = int8["fp32_test_accuracy"] - int8["int8_test_accuracy"] <= 0.01
    assert int8["kept"] is within and (paths.int8_dir / "model.onnx").is_file() is within
    assert read_json(paths.int8_dir / "decision.json") == int8
    production = root / "models" / "production"
    assert (production / "model.onnx").read_bytes() == paths.onnx_model.read_bytes()
    assert read_json(production / "promotion.json")["infra_check"]["top1_agreement"] == 1.0
    assert_dvc_has_nothing_to_do(root)
