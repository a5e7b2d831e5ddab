"""What transfer bought: a transferred backbone beside the same architecture from random weights.

Both arms get the same procedure and budget (:func:`graft.studies.pretrain.train_classifier`:
a linear probe, then every block trained for ``transfer.training.epochs``) on the same target
images with the same preprocessing, once per seed (``transfer.seeds``: the training seed, the
draw of each share of the training split and the scratch arm's initialisation all vary with it).
The comparison reports the three benefits of transfer, each as mean ± std (and min–max) over seeds:

- initial skill: the probe's val accuracy (before any fine-tuning) and the val accuracy after the
  first epoch;
- rate of improvement: epochs and wall-clock seconds until val accuracy first reaches
  ``transfer.target_accuracy``;
- converged skill: the val accuracy after the last epoch, and the test accuracy of the best epoch
  on val;

and a data-efficiency curve: test accuracy with shares of the training split, both arms.

The verdict per benefit ("transferred ahead") is decided on the means. Whether a lead is larger
than the seed-to-seed noise is reported beside it: a figure's lead *exceeds the spread* when the
difference of the means is larger than the sum of the two arms' standard deviations (their
mean ± std intervals do not overlap).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import timm
import torch

from graft.backbones import Backbone
from graft.config import TransferParams
from graft.engines import Engine
from graft.errors import InputError
from graft.studies.pretrain import TaskData, TrainingRun, train_classifier

ARMS = ("transferred", "scratch")


class TransferError(InputError):
    """The transfer report cannot run as configured."""


# Each figure: the benefit it measures, and whether higher is better.
FIGURES: dict[str, tuple[str, bool]] = {
    "probe_val_accuracy": ("initial_skill", True),
    "first_epoch_val_accuracy": ("initial_skill", True),
    "epochs_to_target": ("rate_of_improvement", False),
    "seconds_to_target": ("rate_of_improvement", False),
    "final_val_accuracy": ("converged_skill", True),
    "test_accuracy": ("converged_skill", True),
}
BENEFITS = ("initial_skill", "rate_of_improvement", "converged_skill")


@dataclass
class ArmRun:
    """One arm trained on one share of the training split with one seed."""

    arm: str
    fraction: float
    train_images: int
    probe_val_accuracy: float
    val_accuracy: float
    test_accuracy: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    seed: int = 0

    @classmethod
    def of(cls, arm: str, fraction: float, images: int, run: TrainingRun, seed: int) -> ArmRun:
        return cls(
            arm,
            fraction,
            images,
            run.probe_val_accuracy,
            run.val_accuracy,
            run.test_accuracy,
            run.seconds,
            run.history,
            seed,
        )


@dataclass
class Figures:
    """The three benefits for one arm and one seed, on the full training split."""

    probe_val_accuracy: float
    first_epoch_val_accuracy: float
    epochs_to_target: int | None
    seconds_to_target: float | None
    final_val_accuracy: float
    test_accuracy: float


@dataclass
class Spread:
    """One figure over seeds: mean, sample std (0 for one value), min and max.

    ``missing`` counts the runs without a value (target accuracy never reached): for epochs to
    target they are counted as one epoch past the budget, seconds to target leaves them out.
    """

    mean: float | None
    std: float
    min: float | None
    max: float | None
    values: list[float]
    missing: int = 0

    @classmethod
    def of(cls, values: list[float], missing: int = 0) -> Spread:
        if not values:
            return cls(None, 0.0, None, None, [], missing)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, min(values), max(values), list(values), missing)


@dataclass
class Lead:
    """The transferred arm's lead on one figure, on the means (positive: transferred better)."""

    lead: float | None
    exceeds_spread: bool
    seeds_ahead: int  # seeds in which the transferred run beat the scratch run of the same seed
    seeds: int


@dataclass
class TransferComparison:
    runs: list[ArmRun]
    target_accuracy: float

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs})

    @property
    def fractions(self) -> list[float]:
        return sorted({r.fraction for r in self.runs})

    def run(self, arm: str, fraction: float = 1.0, seed: int | None = None) -> ArmRun:
        seed = self.seeds[0] if seed is None else seed
        return next(
            r for r in self.runs if r.arm == arm and r.fraction == fraction and r.seed == seed
        )

    def budget(self, arm: str) -> int:
        """Epochs trained after the probe (the longest history of the arm on the full split)."""
        return max(
            (int(r["epoch"]) for run in self.runs if run.arm == arm for r in run.history),
            default=0,
        )

    def figures_of(self, arm: str, seed: int) -> Figures:
        """The figures of one seed's run on the full training split."""
        run = self.run(arm, 1.0, seed)
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

    def _values(self, arm: str, name: str) -> list[float | None]:
        """One value per seed; epochs to target counts a run that never reached it as budget + 1."""
        values = []
        for seed in self.seeds:
            value = getattr(self.figures_of(arm, seed), name)
            if value is None and name == "epochs_to_target":
                value = self.budget(arm) + 1
            values.append(value)
        return values

    def figures(self, arm: str) -> dict[str, Spread]:
        """Every figure of ``arm`` over seeds."""
        never = sum(1 for seed in self.seeds if self.figures_of(arm, seed).epochs_to_target is None)
        spreads = {}
        for name in FIGURES:
            values = self._values(arm, name)
            present = [float(v) for v in values if v is not None and not math.isnan(v)]
            missing = never if name in ("epochs_to_target", "seconds_to_target") else 0
            spreads[name] = Spread.of(present, missing)
        return spreads

    def leads(self) -> dict[str, Lead]:
        """The transferred arm's lead per figure, and whether it exceeds the seed spread."""
        t, s = self.figures("transferred"), self.figures("scratch")
        leads = {}
        for name, (_, higher) in FIGURES.items():
            sign = 1.0 if higher else -1.0
            a, b = t[name], s[name]
            lead = None if a.mean is None or b.mean is None else sign * (a.mean - b.mean)
            t_values, s_values = self._values("transferred", name), self._values("scratch", name)
            seeds_ahead = sum(
                1
                for x, y in zip(t_values, s_values, strict=True)
                if x is not None and (y is None or sign * (x - y) > 0)
            )
            leads[name] = Lead(
                lead,
                lead is not None and lead > 0 and lead > a.std + b.std,
                seeds_ahead,
                len(self.seeds),
            )
        return leads

    def _deciding(self) -> dict[str, list[str]]:
        """Per benefit: the figures that decide it, on the means.

        - initial skill: probe and first-epoch accuracy, both must be higher;
        - rate of improvement: epochs to target (a run that never reached it counts as budget +
          1); on equal means, seconds to target (only when every run of both arms reached it);
        - converged skill: final val accuracy and test accuracy (best epoch on val): the
          transferred arm must be behind on neither and ahead on at least one.
        """
        t, s = self.figures("transferred"), self.figures("scratch")
        rate = ["epochs_to_target"]
        epochs_tied = t["epochs_to_target"].mean == s["epochs_to_target"].mean
        if epochs_tied and t["seconds_to_target"].missing == s["seconds_to_target"].missing == 0:
            rate = ["seconds_to_target"]
        converged = [
            name for name in ("final_val_accuracy", "test_accuracy") if t[name].mean != s[name].mean
        ]
        return {
            "initial_skill": ["probe_val_accuracy", "first_epoch_val_accuracy"],
            "rate_of_improvement": rate,
            "converged_skill": converged or ["final_val_accuracy", "test_accuracy"],
        }

    def ahead(self) -> dict[str, bool]:
        """Whether the transferred arm beats the from-scratch one on each benefit (on the means)."""
        leads = self.leads()
        return {
            benefit: all(leads[name].lead is not None and leads[name].lead > 0 for name in names)
            for benefit, names in self._deciding().items()
        }

    def beyond_spread(self) -> dict[str, bool]:
        """Whether each benefit's lead exceeds the seed spread on every figure that decides it."""
        leads, ahead = self.leads(), self.ahead()
        return {
            benefit: ahead[benefit] and all(leads[name].exceeds_spread for name in names)
            for benefit, names in self._deciding().items()
        }

    def curve(self, arm: str) -> list[dict[str, Any]]:
        """The learning curve on the full split over seeds: per epoch, means and spread."""
        by_epoch: dict[int, list[dict[str, Any]]] = {}
        for seed in self.seeds:
            for record in self.run(arm, 1.0, seed).history:
                by_epoch.setdefault(int(record["epoch"]), []).append(record)
        rows = []
        for epoch, records in sorted(by_epoch.items()):
            accuracy = Spread.of([float(r["val_accuracy"]) for r in records])
            seconds = Spread.of([float(r["seconds"]) for r in records])
            rows.append(
                {
                    "epoch": epoch,
                    "seconds": seconds.mean,
                    "val_accuracy": accuracy.mean,
                    "val_accuracy_std": accuracy.std,
                    "val_accuracy_min": accuracy.min,
                    "val_accuracy_max": accuracy.max,
                    "seconds_std": seconds.std,
                    "runs": len(records),
                }
            )
        return rows

    def data_efficiency(self) -> list[dict[str, Any]]:
        """Test accuracy per share of the training split over seeds, both arms side by side."""
        rows = []
        for fraction in self.fractions:
            row: dict[str, Any] = {"fraction": fraction}
            spreads = {}
            for arm in ARMS:
                runs = [self.run(arm, fraction, seed) for seed in self.seeds]
                row["train_images"] = runs[0].train_images
                spreads[arm] = Spread.of([r.test_accuracy for r in runs])
            for arm in ARMS:
                row[arm] = spreads[arm].mean
            for arm in ARMS:
                row.update(
                    {
                        f"{arm}_std": spreads[arm].std,
                        f"{arm}_min": spreads[arm].min,
                        f"{arm}_max": spreads[arm].max,
                    }
                )
            t, s = spreads["transferred"], spreads["scratch"]
            row["lead"] = t.mean - s.mean
            row["exceeds_spread"] = row["lead"] > 0 and row["lead"] > t.std + s.std
            rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        return {
            "target_accuracy": self.target_accuracy,
            "seeds": self.seeds,
            "figures": {
                arm: {name: asdict(spread) for name, spread in self.figures(arm).items()}
                for arm in ARMS
            },
            "leads": {name: asdict(lead) for name, lead in self.leads().items()},
            "ahead": self.ahead(),
            "beyond_spread": self.beyond_spread(),
            "deciding_figures": self._deciding(),
            "data_efficiency": self.data_efficiency(),
        }


def seed_list(params: TransferParams) -> list[int]:
    """The seeds of the runs: ``training.seed``, ``training.seed + 1``, ... (``seeds`` of them)."""
    return [params.training.seed + i for i in range(params.seeds)]


def compare_transfer(
    data: TaskData,
    make_backbone: Callable[[str, int], Backbone],
    params: TransferParams,
    engine: Engine = "auto",
) -> TransferComparison:
    """Train both arms on each share of the training split (``params.fractions``), per seed.

    Args:
        data: the target task.
        make_backbone: ``("transferred" | "scratch", seed)`` to a fresh backbone; both must have
            the same architecture and data config (the seed may set the scratch initialisation).
    """
    # An untimed warm-up epoch: the first training in a process pays one-time costs (kernel
    # selection, thread pools; 10x the steady epoch time, measured) that would count against
    # whichever arm ran first.
    warm_up = params.training.model_copy(update={"epochs": 1})
    train_classifier(make_backbone("scratch", 0), data, warm_up, engine, "warm-up (untimed)")
    runs = []
    seeds = seed_list(params)
    for i, seed in enumerate(seeds):
        training = params.training.model_copy(update={"seed": seed})
        for fraction in sorted(params.fractions, reverse=True):
            train = data.train.subset(fraction, seed)
            subset = TaskData(data.labels, train, data.val, data.test)
            for arm in ARMS:
                name = (
                    f"{arm} (seed {seed}, {i + 1}/{len(seeds)}; {fraction:.0%} of train, "
                    f"{len(train)} images)"
                )
                print(f"transfer: {name}")
                run = train_classifier(make_backbone(arm, seed), subset, training, engine, name)
                runs.append(ArmRun.of(arm, fraction, len(train), run, seed))
    return TransferComparison(runs, params.target_accuracy)


def _pct(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _value(spread: Spread, name: str) -> str:
    """mean ± std (min–max) in the figure's unit."""
    if spread.mean is None:
        return f"not reached in any of {spread.missing} runs" if spread.missing else "—"
    if name == "epochs_to_target":
        text = f"{spread.mean:.1f} ± {spread.std:.1f} epochs ({spread.min:.0f}–{spread.max:.0f})"
    elif name == "seconds_to_target":
        text = f"{spread.mean:.1f} ± {spread.std:.1f} s ({spread.min:.1f}–{spread.max:.1f})"
    else:
        text = (
            f"{100 * spread.mean:.1f} ± {100 * spread.std:.1f}% "
            f"({100 * spread.min:.1f}–{100 * spread.max:.1f})"
        )
    if spread.missing:
        if name == "epochs_to_target":
            runs, counted = len(spread.values), "counted as budget + 1"
        else:
            runs, counted = len(spread.values) + spread.missing, "left out"
        text += f"; {spread.missing} of {runs} runs never reached it ({counted})"
    return text


def _lead(lead: Lead, name: str) -> str:
    if lead.lead is None:
        return "no comparison: an arm never reached it"
    if name == "epochs_to_target":
        amount = f"{lead.lead:+.1f} epochs"
    elif name == "seconds_to_target":
        amount = f"{lead.lead:+.1f} s"
    else:
        amount = f"{100 * lead.lead:+.1f} pts"
    spread = "exceeds the spread" if lead.exceeds_spread else "within the spread"
    if lead.lead <= 0:
        spread = "not ahead"
    return f"{amount}, {spread}; ahead in {lead.seeds_ahead} of {lead.seeds} seeds"


def _verdict(ahead: bool, beyond: bool) -> str:
    if not ahead:
        return "**transferred not ahead**"
    return (
        "transferred ahead, beyond the spread" if beyond else "transferred ahead, within the spread"
    )


ROWS = {
    "probe_val_accuracy": "initial skill: probe accuracy (before any fine-tuning)",
    "first_epoch_val_accuracy": "initial skill: accuracy after the first epoch",
    "epochs_to_target": "rate of improvement: epochs to {target}",
    "seconds_to_target": "rate of improvement: seconds to {target}",
    "final_val_accuracy": "converged skill: accuracy after the last epoch",
    "test_accuracy": "converged skill: test accuracy (best epoch on val)",
}


def render_report(comparison: TransferComparison, context: dict[str, Any]) -> str:
    """The markdown report: the three figures, both learning curves, data efficiency, settings.

    Args:
        context: ``architecture``, ``weights``, ``data_config``, ``labels``, ``images`` (per
            split), ``training`` (the budget), ``source`` (the sidecar's provenance, if any),
            ``command`` and ``plots`` (the PNG paths relative to the report).
    """
    t, s = comparison.figures("transferred"), comparison.figures("scratch")
    leads, ahead, beyond = comparison.leads(), comparison.ahead(), comparison.beyond_spread()
    deciding = comparison._deciding()
    target = _pct(comparison.target_accuracy)
    training = context["training"]
    size = context["data_config"]["input_size"]
    seeds = comparison.seeds
    seed_text = ", ".join(str(seed) for seed in seeds)
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
        f"Every arm and every share of the training split is trained once per seed: "
        f"{len(seeds)} seeds ({seed_text}); the seed sets the training (head initialisation, "
        "batch order, augmentation), the draw of each share of train and the scratch arm's "
        "random initialisation (the transferred arm starts from the one source model). Figures "
        "are mean ± std over seeds (sample std), with min–max in brackets. The verdict per "
        "benefit is decided on the means; a lead *exceeds the spread* when the difference of the "
        "means is larger than the sum of the two standard deviations, and is *within the spread* "
        'otherwise. "Ahead in k of n seeds" compares the two arms seed by seed.',
        "",
        f"Made by `{context['command']}`.",
        "",
        "## The three figures",
        "",
        "| benefit | verdict (on the means) | decided by |",
        "|---|---|---|",
    ]
    for benefit in BENEFITS:
        names = ", ".join(
            ROWS[n].split(": ", 1)[1].format(target=target) for n in deciding[benefit]
        )
        lines.append(
            f"| {benefit.replace('_', ' ')} | {_verdict(ahead[benefit], beyond[benefit])} "
            f"| {names} |"
        )
    lines += [
        "",
        "| figure | transferred | scratch | transferred's lead |",
        "|---|---|---|---|",
    ]
    for name, label in ROWS.items():
        lines.append(
            f"| {label.format(target=target)} | {_value(t[name], name)} | {_value(s[name], name)} "
            f"| {_lead(leads[name], name)} |"
        )
    lines += [
        "",
        "Rate of improvement: a run that never reached the target within the budget counts as "
        "one epoch past it for the epochs; the seconds average the runs that reached it. "
        "Converged skill: the transferred arm must be behind on neither the final val accuracy "
        "nor the test accuracy of the best epoch on val (both means), and ahead on at least one.",
        "",
        "## Learning curves",
        "",
        "Val accuracy against epochs and against wall-clock seconds (epoch 0: the probe), mean "
        "over seeds; the band is ± one std.",
        "",
        f"![learning curves]({context['plots']['curves']})",
        "",
        "| epoch | transferred | seconds | scratch | seconds |",
        "|---|---|---|---|---|",
    ]
    for a, b in zip(comparison.curve("transferred"), comparison.curve("scratch"), strict=False):
        lines.append(
            f"| {a['epoch']} | {_pct(a['val_accuracy'])} ± {100 * a['val_accuracy_std']:.1f} "
            f"| {a['seconds']:.1f} | {_pct(b['val_accuracy'])} ± {100 * b['val_accuracy_std']:.1f} "
            f"| {b['seconds']:.1f} |"
        )
    lines += [
        "",
        "## Data efficiency",
        "",
        "Test accuracy of the best epoch on val, with a stratified share of the training split "
        "(drawn per seed; val and test stay whole), mean ± std over seeds (min–max).",
        "",
        f"![data efficiency]({context['plots']['data_efficiency']})",
        "",
        "| share of train | images | transferred | scratch | transferred's lead |",
        "|---|---|---|---|---|",
    ]
    for row in comparison.data_efficiency():
        cells = [
            f"{_pct(row[arm])} ± {100 * row[f'{arm}_std']:.1f} "
            f"({100 * row[f'{arm}_min']:.1f}–{100 * row[f'{arm}_max']:.1f})"
            for arm in ARMS
        ]
        if row["lead"] <= 0:
            verdict = "not ahead"
        else:
            verdict = "exceeds the spread" if row["exceeds_spread"] else "within the spread"
        lines.append(
            f"| {row['fraction']:.0%} | {row['train_images']} | {cells[0]} | {cells[1]} "
            f"| {100 * row['lead']:+.1f} pts, {verdict} |"
        )
    images = context["images"]
    lines += [
        "",
        "## Settings",
        "",
        f"- Target images: {images['train']} train, {images['val']} val, {images['test']} test.",
        f"- Seeds: {seed_text} (`transfer.seeds: {len(seeds)}` from `transfer.training.seed`).",
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


def initialise_randomly(backbone: Backbone, architecture: str, seed: int) -> None:
    """Re-draw the random weights of ``backbone`` from ``seed`` (timm's own initialisation).

    ``create_backbone(..., "random")`` always draws with seed 0; the scratch arm's initialisation
    is part of its seed-to-seed spread, so each seed gets its own.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = timm.create_model(architecture, pretrained=False, num_classes=0)
    backbone.model.load_state_dict(fresh.state_dict())
