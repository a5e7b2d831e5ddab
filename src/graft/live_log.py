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
    from dvclive import Live  # imported here: it pulls in much of DVC

    shutil.rmtree(directory, ignore_errors=True)
    with Live(str(directory), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for record in history:
            live.step = int(record["epoch"])
            for key, name in LIVE_METRICS.items():
                value = record.get(key)
                if value is not None and math.isfinite(value):
                    live.log_metric(name, value, plot=True)
