"""ONNX export with what serving needs in its metadata, and the torch/onnxruntime parity check."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from graft.errors import Refused

INPUT_NAME, OUTPUT_NAME = "image", "logits"


class ExportRefused(Refused):
    """The candidate may not be exported (not blessed, or parity out of tolerance)."""


def export_onnx(
    model: nn.Module,
    input_size: list[int],
    metadata: dict[str, str],
    dest: Path,
    opset: int,
) -> None:
    """Export ``model`` to ``dest`` with a dynamic batch axis, metadata, and ``onnx.checker``.

    Write to a temporary path (``graft.files.replacing``) and put it in place only once it has
    passed its checks. Metadata holds no timestamps: the same model and inputs give the same
    bytes.
    """
    model = model.eval().to(memory_format=torch.contiguous_format)
    dummy = torch.zeros(1, *input_size)
    torch.onnx.export(
        model,
        (dummy,),
        str(dest),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
    proto = onnx.load(str(dest))
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(dest))


def read_metadata(onnx_path: Path) -> dict[str, Any]:
    """The model's metadata, with JSON values decoded."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    out: dict[str, Any] = {}
    for entry in proto.metadata_props:
        try:
            out[entry.key] = json.loads(entry.value)
        except json.JSONDecodeError:
            out[entry.key] = entry.value
    return out


def onnx_session(onnx_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


def onnx_logits(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


@dataclass(frozen=True)
class Parity:
    images: int
    max_abs_logit_diff: float
    top1_agreement: float

    def within(self, max_abs_logit: float, min_top1_agreement: float) -> bool:
        return (
            self.images > 0
            and self.max_abs_logit_diff <= max_abs_logit
            and self.top1_agreement >= min_top1_agreement
        )


def check_parity(torch_logits: np.ndarray, onnx_logits_: np.ndarray) -> Parity:
    """Compare the two runtimes' logits on the same real images."""
    if torch_logits.shape != onnx_logits_.shape or len(torch_logits) == 0:
        return Parity(len(torch_logits), float("inf"), 0.0)
    return Parity(
        images=len(torch_logits),
        max_abs_logit_diff=float(np.abs(torch_logits - onnx_logits_).max()),
        top1_agreement=float((torch_logits.argmax(1) == onnx_logits_.argmax(1)).mean()),
    )
