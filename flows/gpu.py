"""Fine-tuning on a GPU machine: the `finetune` stage alone, deployed to the `gpu` work pool.

A worker on a GPU host (``prefect worker start --pool gpu``) pulls what the stage needs from
the DVC remote, runs `dvc repro --single-item finetune` there (``features.engine: auto`` picks
torch on CUDA) and pushes ``models/finetuned.pt`` and ``dvc.lock``'s record back; the nightly
flow on the CPU pool then finds the stage up to date. See prefect.yaml and docs/scale.md.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.training import dvc_transfer, run_stage
from graft.config import load_params
from graft.paths import ProjectPaths


@flow(name="graft-finetune")
def finetune(project_dir: str = ".") -> None:
    """dvc pull → finetune (if DVC finds it out of date) → dvc push."""
    paths = ProjectPaths(Path(project_dir).resolve())
    params = load_params(paths.params)
    dvc_transfer("pull", paths.root)
    run_stage("finetune", paths.root, params.flow.stage_timeouts_s["finetune"])
    dvc_transfer("push", paths.root)


if __name__ == "__main__":
    import sys

    finetune(sys.argv[1] if len(sys.argv) > 1 else ".")
