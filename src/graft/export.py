"""ONNX export (the one ``export_onnx``) and the torch/onnxruntime parity check on real images."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from PIL import Image
from torch import nn

from graft.errors import Refused
from graft.files import replacing
from graft.model_metadata import decode_metadata
from graft.preprocessing import load_tensor_batch
from graft.runtime import inference_session, run_single

INPUT_NAME, OUTPUT_NAME = "image", "logits"


class ExportRefused(Refused):
    """The candidate may not be exported (not blessed, or parity out of tolerance)."""


def export_onnx(
    model: nn.Module,
    input_size: list[int] | tuple[int, ...],
    dest: Path,
    *,
    opset: int = 17,
    metadata: Mapping[str, str] | None = None,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
) -> Path:
    """Export ``model`` to ``dest`` with a dynamic batch axis (on the CPU, TorchScript exporter).

    ``dest`` is written through a temporary file, so it is either the complete model or
    untouched. With ``metadata`` (encoded, see graft.model_metadata) the file carries it and has
    passed ``onnx.checker``'s full check; the metadata holds no timestamps, so the same model and
    inputs give the same bytes.
    """
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    dest = Path(dest)
    with replacing(dest) as temporary:
        torch.onnx.export(
            model,
            (torch.zeros(1, *input_size),),
            str(temporary),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
        if metadata is not None:
            proto = onnx.load(str(temporary))
            del proto.metadata_props[:]
            for key, value in sorted(metadata.items()):
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            onnx.checker.check_model(proto, full_check=True)
            onnx.save(proto, str(temporary))
    return dest


def read_metadata(onnx_path: Path) -> dict[str, Any]:
    """The model's metadata, with JSON values decoded."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    return decode_metadata({entry.key: entry.value for entry in proto.metadata_props})


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


def check_parity(torch_logits: np.ndarray, onnx_logits: np.ndarray) -> Parity:
    """Compare the two runtimes' logits on the same real images."""
    if torch_logits.shape != onnx_logits.shape or len(torch_logits) == 0:
        return Parity(len(torch_logits), float("inf"), 0.0)
    return Parity(
        images=len(torch_logits),
        max_abs_logit_diff=float(np.abs(torch_logits - onnx_logits).max()),
        top1_agreement=float((torch_logits.argmax(1) == onnx_logits.argmax(1)).mean()),
    )


def parity_on_images(
    model: nn.Module,
    onnx_path: Path,
    image_paths: list[Path],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 16,
) -> tuple[Parity, np.ndarray]:
    """torch vs onnxruntime on the same images, and the ONNX logits.

    ``batch_size`` images are decoded and held at once, with both runtimes' activations for
    them (16 at 224 px keeps the export stage well under 2 GB resident)."""
    session = inference_session(onnx_path)
    torch_out, onnx_out = [], []
    for start in range(0, len(image_paths), batch_size):
        batch = load_tensor_batch(image_paths[start : start + batch_size], transform)
        with torch.inference_mode():
            torch_out.append(model(batch).numpy())
        onnx_out.append(run_single(session, batch.numpy()))
    if not torch_out:
        return Parity(0, float("inf"), 0.0), np.empty((0, 0))
    onnx_all = np.concatenate(onnx_out)
    return check_parity(np.concatenate(torch_out), onnx_all), onnx_all
