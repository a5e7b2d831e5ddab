"""The training flow: each DVC stage as a Prefect task, the gate checked before export.

Every task runs its stage through `dvc repro --single-item`, so DVC decides what is up to date
and records it in dvc.lock: after this flow `dvc status` is clean and `dvc repro` has nothing
to do. Run it with `python flows/training.py` (Prefect starts a temporary local server).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from graft.files import read_json
from graft.paths import ProjectPaths
from graft.report import run_report_markdown

STAGES_BEFORE_GATE = ("validate", "features", "train_head", "finetune", "evaluate")


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; its output is in the task's log."""


def _stage_environment() -> dict[str, str]:
    # The stages run `graft <stage>`: make this interpreter's scripts (graft, dvc) found first.
    scripts = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": scripts + os.pathsep + os.environ.get("PATH", "")}


@task(task_run_name="{stage}")
def run_stage(stage: str, project_dir: Path) -> None:
    """`dvc repro --single-item STAGE`: runs the stage only if DVC finds it out of date."""
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    process = subprocess.Popen(
        command,
        cwd=project_dir,
        env=_stage_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    tail = []
    for line in process.stdout:
        line = line.rstrip()
        if line:  # universal newlines: each progress-bar redraw arrives as its own line
            logger.info(line)
            tail = (tail + [line])[-20:]
    if process.wait() != 0:
        raise StageFailed(f"stage {stage} failed (exit {process.returncode}):\n" + "\n".join(tail))


@flow(name="graft-training")
def training(project_dir: str = ".") -> dict:
    """Validate → features → train_head → finetune → evaluate → (gate) → export."""
    paths = ProjectPaths(Path(project_dir).resolve())
    for stage in STAGES_BEFORE_GATE:
        run_stage(stage, paths.root)
    blessing = read_json(paths.blessing)
    if blessing["passed"]:
        run_stage("export", paths.root)
        outcome = "exported"
    else:
        outcome = "refused"
        get_run_logger().warning("Gate refused the candidate: %s", "; ".join(blessing["reasons"]))
    create_markdown_artifact(
        key="graft-run-report",
        markdown=run_report_markdown(paths, outcome),
        description=f"graft training run: {outcome}",
    )
    return {"outcome": outcome, "candidate": blessing["candidate"], "reasons": blessing["reasons"]}


if __name__ == "__main__":
    result = training(sys.argv[1] if len(sys.argv) > 1 else ".")
    print(f"graft training flow: {result['outcome']}")
    sys.exit(0 if result["outcome"] == "exported" else 1)
