"""Human-facing evaluation output: the markdown report, the confusion plot and its DVC data."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graft.evaluate import Blessing, candidate_summary
from graft.files import read_json
from graft.paths import ProjectPaths
from graft.plotting import pyplot, save_figure
from graft.tta import tta_summary


def confusion_csv(
    paths: Sequence[str], y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]
) -> str:
    """One row per test image, as DVC's ``confusion`` plot template expects."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "actual", "predicted"])
    for path, actual, predicted in zip(paths, y_true, y_pred, strict=True):
        writer.writerow([path, labels[actual], labels[predicted]])
    return buffer.getvalue()


def save_confusion_plot(matrix: list[list[int]], labels: list[str], dest: Path) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.5 * len(labels) + 2)
    figure, axes = pyplot().subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.array(matrix), display_labels=labels).plot(
        ax=axes, colorbar=False, cmap="Blues"
    )
    axes.set_title("Test confusion matrix (candidate)")
    save_figure(figure, dest)


def save_reliability_plot(reliability: list[dict[str, float]], ece: float, dest: Path) -> None:
    """Accuracy against confidence per bin; the diagonal is perfect calibration."""
    figure, axes = pyplot().subplots(figsize=(4.5, 4.5))
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    confidence = [row["confidence"] for row in reliability]
    accuracy = [row["accuracy"] for row in reliability]
    sizes = [
        20 + 200 * row["count"] / max(1, sum(r["count"] for r in reliability))
        for row in reliability
    ]
    axes.scatter(confidence, accuracy, s=sizes, label="bins (area: images)")
    axes.plot(confidence, accuracy)
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence", ylabel="accuracy")
    axes.set_title(f"Reliability (ECE {ece:.3f})")
    axes.legend(loc="upper left")
    save_figure(figure, dest)


def save_misclassified_gallery(
    image_paths: Sequence[Path], captions: Sequence[str], dest: Path, limit: int = 24
) -> None:
    """A grid of misclassified test images captioned ``true → predicted (confidence)``."""
    from graft.data.images import load_image

    shown = list(zip(image_paths, captions, strict=True))[:limit]
    columns = 6
    rows = max(1, -(-len(shown) // columns))
    figure, axes = pyplot().subplots(rows, columns, figsize=(2 * columns, 2.2 * rows))
    for axis in np.atleast_1d(axes).ravel():
        axis.axis("off")
    for axis, (path, caption) in zip(np.atleast_1d(axes).ravel(), shown, strict=False):
        axis.imshow(load_image(path), interpolation="nearest")
        axis.set_title(caption, fontsize=9)
    if not shown:
        figure.suptitle("No misclassified test images")
    save_figure(figure, dest)


SMALL_TEST_SET = 100  # below this many test images the report warns about the interval


def recipe_lines(finetune_metrics: dict[str, Any]) -> list[str]:
    """The fine-tuning recipes tried (``finetune.recipes``): each trial's val score and seconds,
    and which one was continued and why; nothing when a single recipe ran."""
    trials, choice = finetune_metrics.get("recipes"), finetune_metrics.get("recipe_choice")
    if not trials or not choice:
        return []
    default, chosen = choice["default"], choice["recipe"]
    lines = [
        "Fine-tuning recipes (`finetune.recipes`), each tried for its first epochs and scored by "
        f"its best trial epoch on **val** ({choice['val_images']} images):",
        "",
        "| recipe | trial epochs | val accuracy | seconds | vs the default (95% interval) |",
        "|---|---|---|---|---|",
    ]
    for name, trial in trials.items():
        low, high = choice["gain_over_default_ci95"].get(name, [0.0, 0.0])
        versus = "the default" if name == default else f"{low:+.4f} to {high:+.4f}"
        mark = " **continued**" if name == chosen else ""
        lines.append(
            f"| `{name}`{mark} | {trial['epochs']} | {trial['val_accuracy']:.4f} | "
            f"{trial['seconds']:.0f} | {versus} |"
        )
    reason = (
        "the default; no other recipe was ahead of it beyond noise"
        if chosen == default
        else "ahead of the default beyond noise (the whole 95% interval above 0)"
    )
    return [*lines, "", f"`{chosen}` was continued to its full schedule: {reason}.", ""]


def evaluation_markdown(
    results: dict[str, dict[str, Any]],
    finetune_metrics: dict[str, Any],
    blessing: Blessing,
    misclassified: int,
    tta: dict[str, Any] | None = None,
) -> str:
    """The evaluation report: both models side by side, the gate, per-class results, plots."""
    lines = ["# Evaluation", ""]
    verdict = "**blessed**" if blessing.passed else "**not blessed**"
    lines += [f"Candidate: `{blessing.candidate}` ({blessing.model}) — {verdict}.", ""]
    if finetune_metrics.get("skipped"):
        lines += [
            "Fine-tuning was skipped (finetune.enabled is false or finetune.epochs is 0).",
            "",
        ]
    lines += recipe_lines(finetune_metrics)
    choice = finetune_metrics.get("candidates")
    lines += [
        (
            "The candidate is chosen on **val** among the head, the fine-tuned model and their "
            f"probability average (a tie goes to the simpler): {candidate_summary(choice)}."
        )
        if choice
        else "The candidate is chosen on **val**: val accuracy of the head "
        f"{finetune_metrics['head_val_accuracy']:.4f}.",
        "",
    ]
    if tta:
        lines += [
            f"{tta_summary(tta)[0].upper()}{tta_summary(tta)[1:]} (`evaluate.tta`; chosen on "
            "val"
            + (f", so the `{blessing.candidate}` row below is with it)." if tta["kept"] else ").")
        ]
        lines += [""]
    lines += [
        "## Test metrics",
        "",
        "| model | accuracy | 95% interval | balanced accuracy | macro-F1 | ECE | images |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        low, high = m["accuracy_ci95"]
        lines.append(
            f"| {name} | {m['accuracy']:.4f} | {low:.4f}–{high:.4f} | "
            f"{m['balanced_accuracy']:.4f} | {m['macro_f1']:.4f} | {m['ece']:.4f} | {m['n']} |"
        )
    lines += [
        "",
        "The interval is a percentile bootstrap over the test images; ECE is the expected "
        "calibration error over 15 confidence bins.",
    ]
    calibration = finetune_metrics.get("calibration")
    if calibration:
        lines += [
            "",
            f"The fine-tuned model's logits are divided by a temperature of "
            f"{calibration['temperature']:.3f}, fitted on val and folded into its classifier "
            f"(`finetune.calibrate`; accuracy is unchanged): val ECE "
            f"{calibration['val_ece_before']:.4f} before, {calibration['val_ece']:.4f} after.",
        ]
        if calibration.get("bounded"):
            lines[-1] += (
                f" **Bounded**: val has {calibration['val_errors']} errors in "
                f"{calibration['val_images']} images, too few to fit a temperature on (the "
                f"likelihood alone asks for {calibration['likelihood_temperature']:.3f}); it is "
                f"raised until the mean val confidence is {calibration['confidence_ceiling']:.4f},"
                " Laplace's estimate of the accuracy."
            )
    spread = finetune_metrics.get("temperature_splits") or {}
    if spread.get("splits"):
        low, high = spread["temperature_ci90"]
        lines += [
            "",
            f"Val is small: on {spread['splits']} half-splits of val the temperature fitted on "
            f"one half ranges {low:.3f}–{high:.3f} (90%) and takes the other half's log-loss "
            f"from {spread['heldout_nll_before']:.4f} to {spread['heldout_nll_after']:.4f}: "
            + ("kept." if spread["kept"] else "not applied (it does not help held-out images)."),
        ]
    candidate = results[blessing.candidate]
    if candidate["n"] < SMALL_TEST_SET:
        low, high = candidate.get("accuracy_ci95_wilson", candidate["accuracy_ci95"])
        lines += [
            "",
            f"> **Only {candidate['n']} test images.** The candidate's accuracy could be anywhere "
            f"in {low:.2f}–{high:.2f} (Wilson 95% interval, {high - low:.2f} wide): differences "
            "smaller than that are not evidence. Add test images before comparing models.",
        ]
    lines += [
        "",
        "## Gate",
        "",
        "| check | value | minimum | passed |",
        "|---|---|---|---|",
    ]
    for check in blessing.checks:
        value = "missing" if check.value is None else f"{check.value:.4f}"
        lines.append(f"| {check.name} | {value} | {check.threshold:.4f} | {check.passed} |")
    for reason in blessing.reasons:
        lines.append(f"- {reason}")
    lines += ["", "## Per class (candidate)", "", "| class | precision | recall | f1 | support |"]
    lines.append("|---|---|---|---|---|")
    for label, row in results[blessing.candidate]["per_class"].items():
        lines.append(
            f"| {label} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} "
            f"| {row['support']} |"
        )
    lines += [
        "",
        "## Plots",
        "",
        "![confusion matrix](../plots/confusion.png) ![reliability](../plots/reliability.png)",
        "",
        f"Misclassified test images ({misclassified}; up to 24 shown, "
        "captioned true → predicted (confidence)):",
        "",
        "![misclassified](../plots/misclassified.png)",
        "",
    ]
    return "\n".join(lines)


def run_report_markdown(
    paths: ProjectPaths,
    outcome: str,
    reasons: list[str],
    stages_done: list[str],
    promotion: dict[str, Any] | None = None,
) -> str:
    """The flow run's report: its outcome and why, then what each stage that ran produced
    (validation counts, head-only vs fine-tuned, the gate, export parity, what was promoted)."""

    def load(path: Path) -> dict[str, Any]:
        return read_json(path) if path.is_file() else {}

    lines = [f"# graft training run: {outcome}", ""]
    lines += [f"- {reason}" for reason in reasons]
    lines += [
        "",
        "Stages run (DVC skips those already up to date): " + (", ".join(stages_done) or "none"),
        "",
    ]
    if "validate" in stages_done:
        validation = load(paths.metrics / "validation.json")
        lines += [
            f"Data: {validation.get('images')} images, {validation.get('ok')} usable, "
            f"{validation.get('quarantined')} quarantined, {validation.get('classes')} classes.",
            "",
        ]
    if "evaluate" in stages_done:
        head, finetune = load(paths.metrics / "head.json"), load(paths.metrics / "finetune.json")
        evaluation, blessing = load(paths.metrics / "eval.json"), load(paths.blessing)
        lines += ["| model | val accuracy | test accuracy | test macro-F1 |", "|---|---|---|---|"]
        val_of = {"head": head.get("val_accuracy"), "finetuned": finetune.get("val_accuracy")}
        for name, val in val_of.items():
            test = evaluation.get(name, {})
            cells = [val, test.get("accuracy"), test.get("macro_f1")]
            lines.append(f"| {name} | " + " | ".join(_fmt(c) for c in cells) + " |")
        lines += [
            "",
            f"Candidate: `{blessing.get('candidate')}`; value gates passed: "
            f"{blessing.get('passed')}.",
        ]
        for check in blessing.get("checks", []):
            mark = "passed" if check["passed"] else "**failed**"
            lines.append(
                f"- {check['name']} {_fmt(check['value'])} (minimum {check['threshold']}): {mark}"
            )
    if "export" in stages_done:
        export = load(paths.metrics / "export.json")
        parity = export.get("parity", {})
        int8 = export.get("int8") or {}
        lines += [
            "",
            f"Exported `models/model.onnx`: parity on {parity.get('images')} test images, "
            f"max |Δ logit| {parity.get('max_abs_logit_diff', float('nan')):.2e}, "
            f"top-1 agreement {parity.get('top1_agreement', float('nan')):.2%}. "
            f"INT8: {int8.get('reason', 'not made')}.",
        ]
    if promotion:
        lines += ["", promotion_markdown(promotion).replace("# Promotion", "## Promotion", 1)]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}"


def promotion_markdown(record: dict[str, Any]) -> str:
    """``reports/promotion.md``: what was compared, what each gate said, and what happened."""
    verdict = "PROMOTED" if record["promoted"] else "REFUSED"
    if record["promoted"] and record["forced"]:
        verdict = "PROMOTED BY FORCE"
    lines = [f"# Promotion: {verdict}", "", f"Challenger sha256 `{record['model_sha256']}`."]
    if record["forced"]:
        lines += ["", f"**Forced** past failing gates. Reason given: {record['reason']}"]
    champion = record.get("champion_metrics")
    lines += ["", "| model | test accuracy | macro-F1 |", "|---|---|---|"]
    lines.append(
        f"| challenger | {_fmt(record['metrics'].get('accuracy'))} | "
        f"{_fmt(record['metrics'].get('macro_f1'))} |"
    )
    if champion:
        lines.append(
            f"| production (`{record['previous_sha256'][:12]}`) | "
            f"{_fmt(champion.get('accuracy'))} | {_fmt(champion.get('macro_f1'))} |"
        )
    else:
        lines += ["", "Nothing was in production: only the value gates applied."]
    if record["checks"]:
        lines += ["", "| change gate | value | threshold | passed |", "|---|---|---|---|"]
        for check in record["checks"]:
            lines.append(
                f"| {check['name']} | {_fmt(check['value'])} | {_fmt(check['threshold'])} | "
                f"{'yes' if check['passed'] else '**no**'} |"
            )
    lines += [f"- {reason}" for reason in record["reasons"]]
    infra = record.get("infra_check")
    if infra:
        lines += [
            "",
            f"Infra check (`graft serve` on loopback): "
            f"{'passed' if infra['passed'] else '**failed**'} — {infra['detail']}.",
        ]
    return "\n".join(lines) + "\n"
