"""What an exported model carries in its ONNX ``metadata_props``, and the one codec for it.

The export stage writes it (:func:`model_metadata`, :func:`encode_metadata`); evaluation,
promotion and the server read it back (:func:`decode_metadata`). Pure Python: the server, which
has no torch and no ``onnx`` package, decodes with it too.

Keys: ``graft_version``, ``labels`` (JSON list, in output order), ``preprocessing`` (timm's data
config, JSON), ``backbone``, ``weights``, ``weights_sha256``, ``candidate``, ``data_version``
(the md5 of ``data/`` in ``data.dvc``), ``git_revision`` and ``metrics`` (JSON). No timestamps:
the same model and inputs give the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import graft

if TYPE_CHECKING:
    from graft.classifier import ModelSpec

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1")


def model_metadata(
    spec: ModelSpec,
    *,
    candidate: str,
    metrics: Mapping[str, Any],
    data_version: str,
    git_revision: str,
) -> dict[str, str]:
    """The encoded metadata of a model exported from ``spec``; ``metrics`` are its test metrics."""
    return encode_metadata(
        {
            "graft_version": graft.__version__,
            "labels": list(spec.labels),
            "preprocessing": spec.data_config.as_dict(),
            "backbone": spec.backbone,
            "weights": spec.weights,
            "weights_sha256": spec.weights_sha256 or "",
            "candidate": candidate,
            "data_version": data_version,
            "git_revision": git_revision,
            "metrics": {key: metrics[key] for key in METRIC_KEYS},
        }
    )


def model_version_of(checkpoint_sha256: str) -> int:
    """The ONNX ``model_version`` (an int64) of a model: the first 48 bits of its checkpoint's
    sha256, so the same trained weights give the same version and other weights another."""
    return int(checkpoint_sha256[:12], 16)


def contract_doc_string(
    spec: ModelSpec, *, uint8_input: bool = False, input_name: str = "image"
) -> str:
    """The ONNX ``doc_string``: what goes in and comes out, for a client outside Python."""
    config = spec.data_config.as_dict()
    channels, height, width = config["input_size"]
    resize = (
        f"resize ({config.get('interpolation')}, crop_pct {config.get('crop_pct')}, "
        f"{config.get('crop_mode', 'center')} crop) to {height}x{width}"
    )
    if uint8_input:
        given = (
            f"'{input_name}': uint8 RGB pixels, NHWC [batch, {height}, {width}, {channels}], "
            f"after {resize}; scaling and normalisation are inside the graph"
        )
    else:
        given = (
            f"'{input_name}': float32 NCHW [batch, {channels}, {height}, {width}]: {resize}, "
            f"scale to [0, 1], subtract mean {config['mean']}, divide by std {config['std']}"
        )
    return (
        f"graft image classifier (timm {spec.backbone} and a trained head). Input {given}. "
        f"Output 'logits': [batch, {len(spec.labels)}], softmax gives the probabilities of the "
        "labels in metadata 'labels' (and labels.txt beside the file), in that order; "
        "metadata 'preprocessing' is timm's data config."
    )


def encode_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """Strings as they are, anything else as JSON with sorted keys."""
    return {
        key: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        for key, value in values.items()
    }


def decode_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    """The metadata with JSON values decoded, sorted by key; other values stay strings.

    NaN and Infinity stay strings: a server's response must never carry a non-finite number.
    """
    out: dict[str, Any] = {}
    for key, value in sorted(props.items()):
        try:
            out[key] = json.loads(value, parse_constant=str)
        except json.JSONDecodeError:
            out[key] = value
    return out
