"""What transfer bought: a transferred backbone beside the same architecture from random weights.

Both arms get the same procedure and budget (:func:`graft.pretrain.train_classifier`: a linear
probe, then every block trained for ``transfer.training.epochs``) on the same target images with
the same preprocessing. The comparison reports the three benefits of transfer:

- initial skill: the probe's val accuracy (before any fine-tuning) and the val accuracy after the
  first epoch;
- rate of improvement: epochs and wall-clock seconds until val accuracy first reaches
  ``transfer.target_accuracy``;
- converged skill: the val accuracy after the last epoch, and the test accuracy of the best epoch;

and a data-efficiency curve: test accuracy with shares of the training split, both arms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from graft.backbones import Backbone
from graft.config import TransferParams
from graft.engines import Engine
from graft.pretrain import TaskData, TrainingRun, train_classifier

ARMS = ("transferred", "scratch")


@dataclass
class ArmRun:
    """One arm trained on one share of the training split."""

    arm: str
    fraction: float
    train_images: int
    probe_val_accuracy: float
    val_accuracy: float
    test_accuracy: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, arm: str, fraction: float, images: int, run: TrainingRun) -> ArmRun:
        return cls(
            arm,
            fraction,
            images,
            run.probe_val_accuracy,
            run.val_accuracy,
            run.test_accuracy,
            run.seconds,
            run.history,
        )


@dataclass
class Figures:
    """The three benefits for one arm, on the full training split."""

    probe_val_accuracy: float
    first_epoch_val_accuracy: float
    epochs_to_target: int | None
    seconds_to_target: float | None
    final_val_accuracy: float
    test_accuracy: float


@dataclass
class TransferComparison:
    runs: list[ArmRun]
    target_accuracy: float

    def run(self, arm: str, fraction: float = 1.0) -> ArmRun:
        return next(r for r in self.runs if r.arm == arm and r.fraction == fraction)

    def figures(self, arm: str) -> Figures:
        run = self.run(arm)
        epochs = [r for r in run.history if r["epoch"] > 0]
        reached = next((r for r in run.history if r["val_accuracy"] >= self.target_accuracy), None)
        return Figures(
            probe_val_accuracy=run.probe_val_accuracy,
            first_epoch_val_accuracy=epochs[0]["val_accuracy"] if epochs else math.nan,
            epochs_to_target=None if reached is None else int(reached["epoch"]),
            seconds_to_target=None if reached is None else float(reached["seconds"]),
            final_val_accuracy=epochs[-1]["val_accuracy"] if epochs else run.probe_val_accuracy,
            test_accuracy=run.test_accuracy,
        )

    def ahead(self) -> dict[str, bool]:
        """Whether the transferred arm beats the from-scratch one on each benefit."""
        t, s = self.figures("transferred"), self.figures("scratch")
        never = math.inf
        t_epochs = never if t.epochs_to_target is None else t.epochs_to_target
        s_epochs = never if s.epochs_to_target is None else s.epochs_to_target
        t_seconds = never if t.seconds_to_target is None else t.seconds_to_target
        s_seconds = never if s.seconds_to_target is None else s.seconds_to_target
        return {
            "initial_skill": t.probe_val_accuracy > s.probe_val_accuracy
            and t.first_epoch_val_accuracy > s.first_epoch_val_accuracy,
            "rate_of_improvement": t_epochs < s_epochs
            or (t_epochs == s_epochs < never and t_seconds < s_seconds),
            "converged_skill": t.final_val_accuracy > s.final_val_accuracy
            or (t.final_val_accuracy == s.final_val_accuracy and t.test_accuracy > s.test_accuracy),
        }

    def data_efficiency(self) -> list[dict[str, Any]]:
        """Test accuracy per share of the training split, both arms side by side."""
        rows = []
        for fraction in sorted({r.fraction for r in self.runs}):
            transferred, scratch = self.run("transferred", fraction), self.run("scratch", fraction)
            rows.append(
                {
                    "fraction": fraction,
                    "train_images": transferred.train_images,
                    "transferred": transferred.test_accuracy,
                    "scratch": scratch.test_accuracy,
                }
            )
        return rows

    def summary(self) -> dict[str, Any]:
        return {
            "target_accuracy": self.target_accuracy,
            "figures": {arm: asdict(self.figures(arm)) for arm in ARMS},
            "ahead": self.ahead(),
            "data_efficiency": self.data_efficiency(),
        }


def compare_transfer(
    data: TaskData,
    make_backbone: Callable[[str], Backbone],
    params: TransferParams,
    engine: Engine = "auto",
) -> TransferComparison:
    """Train both arms on each share of the training split (``params.fractions``).

    Args:
        data: the target task.
        make_backbone: ``"transferred"`` or ``"scratch"`` to a fresh backbone; both must have
            the same architecture and data config.
    """
    # An untimed warm-up epoch: the first training in a process pays one-time costs (kernel
    # selection, thread pools; 10x the steady epoch time, measured) that would count against
    # whichever arm ran first.
    warm_up = params.training.model_copy(update={"epochs": 1})
    train_classifier(make_backbone("scratch"), data, warm_up, engine, "warm-up (untimed)")
    runs = []
    for fraction in sorted(params.fractions, reverse=True):
        train = data.train.subset(fraction, params.training.seed)
        subset = TaskData(data.labels, train, data.val, data.test)
        for arm in ARMS:
            name = f"{arm} ({fraction:.0%} of train, {len(train)} images)"
            print(f"transfer: {name}")
            run = train_classifier(make_backbone(arm), subset, params.training, engine, name)
            runs.append(ArmRun.of(arm, fraction, len(train), run))
    return TransferComparison(runs, params.target_accuracy)


def _pct(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _count(value: float | None, unit: str) -> str:
    if value is None:
        return "not reached"
    return f"{value:.0f} {unit}" if unit == "s" else f"{value} {unit}"


def _mark(ahead: bool) -> str:
    return "transferred ahead" if ahead else "**transferred not ahead**"


def render_report(comparison: TransferComparison, context: dict[str, Any]) -> str:
    """The markdown report: the three figures, both learning curves, data efficiency, settings.

    Args:
        context: ``architecture``, ``weights``, ``data_config``, ``labels``, ``images`` (per
            split), ``training`` (the budget), ``source`` (the sidecar's provenance, if any),
            ``command`` and ``plots`` (the PNG paths relative to the report).
    """
    t, s = comparison.figures("transferred"), comparison.figures("scratch")
    ahead = comparison.ahead()
    target = _pct(comparison.target_accuracy)
    training = context["training"]
    size = context["data_config"]["input_size"]
    lines = [
        "# Transfer benefit",
        "",
        f"`{context['architecture']}` from `{context['weights']}` (transferred) beside the same "
        f"architecture from random weights (scratch), on the target classes "
        f"{', '.join(context['labels'])}; the same procedure and budget for both: a linear probe "
        f"on the frozen features, then every block trained for {training['epochs']} epochs "
        f"(batch {training['batch_size']}, peak LR {training['lr']}, BatchNorm "
        f"{training['bn']}), {size[1]}x{size[2]} px, the same preprocessing. "
        "Accuracies on val unless marked test; seconds are wall-clock from the start of the run "
        "(feature extraction for the probe included).",
        "",
        f"Made by `{context['command']}`.",
        "",
        "## The three figures",
        "",
        "| figure | transferred | scratch | |",
        "|---|---|---|---|",
        f"| initial skill: probe accuracy (before any fine-tuning) | {_pct(t.probe_val_accuracy)} "
        f"| {_pct(s.probe_val_accuracy)} | {_mark(ahead['initial_skill'])} |",
        f"| initial skill: accuracy after the first epoch | {_pct(t.first_epoch_val_accuracy)} "
        f"| {_pct(s.first_epoch_val_accuracy)} | |",
        f"| rate of improvement: epochs to {target} | {_count(t.epochs_to_target, 'epochs')} "
        f"| {_count(s.epochs_to_target, 'epochs')} | {_mark(ahead['rate_of_improvement'])} |",
        f"| rate of improvement: seconds to {target} | {_count(t.seconds_to_target, 's')} "
        f"| {_count(s.seconds_to_target, 's')} | |",
        f"| converged skill: accuracy after the last epoch | {_pct(t.final_val_accuracy)} "
        f"| {_pct(s.final_val_accuracy)} | {_mark(ahead['converged_skill'])} |",
        f"| converged skill: test accuracy (best epoch on val) | {_pct(t.test_accuracy)} "
        f"| {_pct(s.test_accuracy)} | |",
        "",
        "## Learning curves",
        "",
        "Val accuracy against epochs and against wall-clock seconds (epoch 0: the probe).",
        "",
        f"![learning curves]({context['plots']['curves']})",
        "",
        "| epoch | transferred | seconds | scratch | seconds |",
        "|---|---|---|---|---|",
    ]
    t_hist = comparison.run("transferred").history
    s_hist = comparison.run("scratch").history
    for a, b in zip(t_hist, s_hist, strict=False):
        lines.append(
            f"| {a['epoch']} | {_pct(a['val_accuracy'])} | {a['seconds']:.0f} "
            f"| {_pct(b['val_accuracy'])} | {b['seconds']:.0f} |"
        )
    lines += [
        "",
        "## Data efficiency",
        "",
        "Test accuracy of the best epoch on val, with a stratified share of the training split "
        "(smaller shares are subsets of larger ones; val and test stay whole).",
        "",
        f"![data efficiency]({context['plots']['data_efficiency']})",
        "",
        "| share of train | images | transferred | scratch |",
        "|---|---|---|---|",
    ]
    for row in comparison.data_efficiency():
        lines.append(
            f"| {row['fraction']:.0%} | {row['train_images']} | {_pct(row['transferred'])} "
            f"| {_pct(row['scratch'])} |"
        )
    images = context["images"]
    lines += [
        "",
        "## Settings",
        "",
        f"- Target images: {images['train']} train, {images['val']} val, {images['test']} test.",
        f"- Preprocessing (both arms): `{context['data_config']}`.",
    ]
    source = context.get("source")
    if source:
        lines.append(
            f"- Source model: trained by `graft pretrain` on {source.get('source_dir')}/ classes "
            f"{', '.join(source.get('classes', []))} from {source.get('init')} weights "
            f"(source val accuracy {_pct(source.get('val_accuracy'))}); sha256 "
            f"`{context.get('weights_sha256')}`."
        )
    return "\n".join(lines) + "\n"
