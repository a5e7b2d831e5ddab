"""The training flow: dvc pull, each DVC stage as a Prefect task, gates, promotion, dvc push.

Every stage runs through `dvc repro --single-item`, so DVC decides what is out of date and
records it in dvc.lock: after this flow `dvc status` is clean, and a run that crashed re-runs
only the stages DVC finds out of date. `dvc pull` and `dvc push` are I/O and are retried with
back-off; stages are computation and are not retried, but each has a time limit
(`flow.stage_timeouts_s` in params.yaml).

A run ends in one of three outcomes, which name its final state in the Prefect UI and head the
markdown run report it publishes (artifact key `graft-run-report`):

- **Promoted**: every gate passed and `graft promote` switched production to the new model
  (or **Exported** when the flow runs with `promote=False`);
- **Refused**: a gate said no (the value gates at evaluate, or the change gates and infra check
  at promotion); the reasons are in the state message and the report; production is untouched;
- **Failed**: a stage or a DVC transfer failed, or ``data/`` differs from ``data.dvc`` (checked
  before ``dvc pull``, which would check the recorded version out over it; set
  ``flow.record_data: true`` to record it instead); the state message names the step and the
  error.

Run as a script, it exits with graft's codes (graft.errors.ExitCode): 0 promoted or exported,
3 refused, 4 the input needs attention (params.yaml, data/, a stage's bad input), 1 a failure.

Failures and refusals notify the Prefect notification block named in `flow.notify_block`.
Run it with `python flows/training.py [PROJECT_DIR]` (Prefect starts a temporary local server),
or deploy it on a schedule with `prefect deploy` (see prefect.yaml and docs/scheduling.md).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed
from prefect.tasks import exponential_backoff

from graft.config import load_params
from graft.errors import ExitCode, GraftError, exit_code_of
from graft.files import read_json
from graft.paths import ProjectPaths
from graft.report import run_report_markdown

STAGES_BEFORE_GATE = ("validate", "features", "train_head", "finetune", "evaluate")
REPORT_KEY = "graft-run-report"


class StageFailed(GraftError):
    """A DVC stage exited non-zero or ran past its time limit; its output is in the task log.
    Its exit code is the stage's own when graft refused or named bad input, else FAILED."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DvcTransferFailed(GraftError):
    """`dvc pull` or `dvc push` failed (retried before the run fails)."""


def _stage_environment() -> dict[str, str]:
    # The stages run `graft <stage>`: make this interpreter's scripts (graft, dvc) found first.
    scripts = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": scripts + os.pathsep + os.environ.get("PATH", "")}


def _run_logged(command: list[str], cwd: Path, timeout_s: float | None = None) -> tuple[int, str]:
    """Run ``command``, streaming its output to the run log; kill its process group at the
    time limit. Returns the exit code (-9 when killed) and the last lines of output."""
    logger = get_run_logger()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=_stage_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the stage's own children are stopped with it
    )
    timer = None
    if timeout_s is not None:
        timer = threading.Timer(timeout_s, os.killpg, (process.pid, signal.SIGKILL))
        timer.start()
    tail: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if line:  # universal newlines: each progress-bar redraw arrives as its own line
                logger.info(line)
                tail = (tail + [line])[-20:]
        code = process.wait()
    finally:
        if timer is not None:
            timer.cancel()
    return code, "\n".join(tail)


@task(task_run_name="{stage}")
def run_stage(stage: str, project_dir: Path, timeout_s: float) -> None:
    """`dvc repro --single-item STAGE`: runs the stage only if DVC finds it out of date."""
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    code, tail = _run_logged(command, project_dir, timeout_s)
    if code == -signal.SIGKILL:
        raise StageFailed(
            f"stage {stage} ran past its time limit of {timeout_s:g} s and was stopped "
            f"(flow.stage_timeouts_s.{stage} in params.yaml)"
        )
    if code != 0:
        raise StageFailed(f"stage {stage} failed (exit {code}):\n{tail}", _graft_exit_code(tail))


def _graft_exit_code(dvc_output: str) -> ExitCode:
    """The exit code of the graft command inside a failed `dvc repro`, as DVC reports it."""
    found = re.findall(r"exited with (\d+)", dvc_output)
    codes = {code.value for code in (ExitCode.REFUSED, ExitCode.BAD_INPUT)}
    return ExitCode(int(found[-1])) if found and int(found[-1]) in codes else ExitCode.FAILED


@task(task_run_name="check data")
def check_data(project_dir: Path, record: bool) -> str:
    """data/ against data.dvc, before `dvc pull` could check the recorded version out over it:
    a difference stops the run (or is recorded with `dvc add --no-relink data`)."""
    from graft.stages.check_data import main

    found = main(project_dir, record=record)
    messages = {
        "untracked": "No data.dvc: data/ is not versioned by DVC (`graft check-data --record` "
        "versions it).",
        "absent": "data/ is empty: dvc pull brings the version data.dvc records.",
        "unchanged": "data/ is the version data.dvc records.",
        "recorded": "data/ differed from data.dvc: recorded (flow.record_data: true); "
        "commit data.dvc to keep this version.",
    }
    get_run_logger().info(messages[found])
    return found


def _has_dvc_remote(project_dir: Path) -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "list"],
        cwd=project_dir,
        capture_output=True,
        text=True,
        env=_stage_environment(),
    )
    return result.returncode == 0 and bool(result.stdout.strip())


@task(
    task_run_name="dvc {direction}",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),  # 2 s, 4 s, 8 s
)
def dvc_transfer(direction: str, project_dir: Path) -> str:
    """`dvc pull` (what is missing here) or `dvc push` (what the run produced) to the remote."""
    if not _has_dvc_remote(project_dir):
        get_run_logger().warning("No DVC remote is configured: dvc %s skipped.", direction)
        return "skipped"
    command = [sys.executable, "-m", "dvc", direction]
    if direction == "pull":
        command.append("--allow-missing")  # a first run: the remote does not have it all yet
    code, tail = _run_logged(command, project_dir)
    if code != 0:
        raise DvcTransferFailed(f"dvc {direction} failed (exit {code}):\n{tail}")
    return "done"


@task
def promote_model(project_dir: Path) -> dict[str, Any]:
    """`graft promote`: change gates against production, the infra check, the atomic switch."""
    from graft.promotion import PromotionRefused, promote

    try:
        record = promote(project_dir, load_params(ProjectPaths(project_dir).params))
    except PromotionRefused as refused:
        return {"promoted": False, "reasons": [str(refused)]}
    return record.to_dict()


def _notify(flow, flow_run, state) -> None:
    """Tell the notification block in `flow.notify_block` (if any) about a failure or refusal."""
    if state.is_completed() and state.name != "Refused":
        return
    project_dir = Path(flow_run.parameters.get("project_dir", "."))
    try:
        block_name = load_params(ProjectPaths(project_dir).params).flow.notify_block
    except Exception:  # the params themselves may be what failed
        block_name = ""
    if not block_name:
        return
    from prefect.blocks.core import Block

    block = Block.load(block_name)
    block.notify(
        body=f"{state.name}: {state.message}\nproject: {project_dir.resolve()}",
        subject=f"graft training run {flow_run.name}: {state.name}",
    )


@flow(name="graft-training", on_failure=[_notify], on_completion=[_notify])
def training(project_dir: str = ".", promote: bool = True):
    """dvc pull → validate → features → train_head → finetune → evaluate → (gate) → export →
    (promote) → dvc push; the final state is Promoted, Exported, Refused or Failed."""
    paths = ProjectPaths(Path(project_dir).resolve())
    params = load_params(paths.params)
    stages_done: list[str] = []
    promotion: dict[str, Any] | None = None
    current = "check data"
    try:
        check_data(paths.root, params.flow.record_data)
        current = "dvc pull"
        dvc_transfer("pull", paths.root)
        for stage in STAGES_BEFORE_GATE:
            current = stage
            run_stage(stage, paths.root, params.flow.stage_timeouts_s[stage])
            stages_done.append(stage)
        blessing = read_json(paths.blessing)
        reasons = list(blessing["reasons"])
        if not blessing["passed"]:
            outcome = "Refused"
        else:
            current = "export"
            run_stage("export", paths.root, params.flow.stage_timeouts_s["export"])
            stages_done.append("export")
            outcome = "Exported"
            if promote:
                current = "promote"
                promotion = promote_model(paths.root)
                outcome = "Promoted" if promotion["promoted"] else "Refused"
                reasons += promotion["reasons"]
        current = "dvc push"
        dvc_transfer("push", paths.root)
    except Exception as error:
        message = f"failed at {current}: {error}"
        _publish(paths, "Failed", [message], stages_done, promotion)
        raise
    if outcome == "Refused":
        get_run_logger().warning("Refused: %s", "; ".join(reasons))
    _publish(paths, outcome, reasons, stages_done, promotion)
    result = {"outcome": outcome.lower(), "candidate": blessing["candidate"], "reasons": reasons}
    return Completed(name=outcome, message="; ".join(reasons) or outcome, data=result)


def _publish(paths, outcome, reasons, stages_done, promotion) -> None:
    create_markdown_artifact(
        key=REPORT_KEY,
        markdown=run_report_markdown(paths, outcome, reasons, stages_done, promotion),
        description=f"graft training run: {outcome}",
    )


if __name__ == "__main__":
    try:
        result = training(sys.argv[1] if len(sys.argv) > 1 else ".")
    except Exception as error:
        print(f"graft training flow: failed: {error}", file=sys.stderr)
        sys.exit(exit_code_of(error))
    print(f"graft training flow: {result['outcome']}")
    sys.exit(ExitCode.OK if result["outcome"] in ("promoted", "exported") else ExitCode.REFUSED)
