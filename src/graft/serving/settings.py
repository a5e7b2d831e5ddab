"""What ``graft serve`` was asked: one picklable value, passed to every worker's application."""

from __future__ import annotations

from dataclasses import dataclass, field

from graft.serving.limits import Limits, ServerLimits


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``graft serve`` was asked, picklable for worker processes."""

    model_path: str
    limits: Limits = field(default_factory=Limits)
    server_limits: ServerLimits = field(default_factory=ServerLimits)
    reload_interval_s: float = 2.0
    threads: int | None = None
    model_name: str = "graft"
    docs: bool = True
