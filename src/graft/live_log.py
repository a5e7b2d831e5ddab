"""Per-epoch learning curves as DVCLive logs, which ``dvc plots show`` draws."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LIVE_METRICS = {"train_loss": "train/loss", "val_loss": "val/loss", "val_accuracy": "val/accuracy"}


def write_live_log(directory: Path, history: Sequence[dict[str, Any]]) -> None:
    """Write ``history`` (one record per epoch, step = its ``epoch``) as a DVCLive log.

    The log is written from the finished history rather than during training, so a resumed
    run's log holds every epoch exactly once, whatever happened in between.
    """
    shutil.rmtree(directory, ignore_errors=True)
    with _live_class()(str(directory), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for record in history:
            live.step = int(record["epoch"])
            for key, name in LIVE_METRICS.items():
                value = record.get(key)
                if value is not None and math.isfinite(value):
                    live.log_metric(name, value, plot=True)
    # No epochs (fine-tuning off or skipped): the plots folder still exists, empty, so that the
    # stage's declared output does and `dvc repro` goes on.
    (directory / "plots" / "metrics").mkdir(parents=True, exist_ok=True)


def _live_class() -> type:
    """DVCLive's ``Live``, tolerant of a git repository without a commit yet.

    DVCLive 3 asks git for HEAD before it checks whether there is one, so in a fresh ``git init``
    (before the first commit) it raises. graft saves no DVC experiment from here, so the
    repository's history is not needed: carry on without it.
    """
    from dvclive import Live  # imported here: it pulls in much of DVC
    from scmrepo.exceptions import SCMError

    class _Live(Live):
        def _init_dvc(self) -> None:
            try:
                super()._init_dvc()
            except SCMError:
                self._dvc_repo = None
                self._dvc_file = self._init_dvc_file()

    return _Live
