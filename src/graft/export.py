"""ONNX export (the one ``export_onnx``) and the torch/onnxruntime parity check on real images."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from PIL import Image
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same_arg
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
    doc_string: str = "",
    model_version: int = 0,
) -> Path:
    """Export ``model`` to ``dest`` with a dynamic batch axis (on the CPU, TorchScript exporter).

    ``dest`` is written through a temporary file, so it is either the complete model or
    untouched. With ``metadata`` (encoded, see graft.model_metadata) the file carries it and has
    passed ``onnx.checker``'s full check, with ``doc_string`` and ``model_version`` (see
    :func:`describe_model`); the metadata holds no timestamps, so the same model and inputs give
    the same bytes.
    """
    model = with_static_padding(
        model.eval().to("cpu", memory_format=torch.contiguous_format), input_size
    )
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
            describe_model(proto, metadata, doc_string=doc_string, model_version=model_version)
            onnx.checker.check_model(proto, full_check=True)
            onnx.save(proto, str(temporary))
    return dest


def describe_model(
    proto: onnx.ModelProto,
    metadata: Mapping[str, str],
    *,
    doc_string: str = "",
    model_version: int = 0,
) -> onnx.ModelProto:
    """Set ``proto``'s metadata (replacing any), ``doc_string`` and ``model_version`` in place."""
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = doc_string
    proto.model_version = model_version
    return proto


def with_static_padding(model: nn.Module, input_size: list[int] | tuple[int, ...]) -> nn.Module:
    """A copy of ``model`` whose TF-style "same" convolutions pad by constants.

    timm's ``Conv2dSame`` (the strided convolutions of the ``tf_`` EfficientNets) computes its
    padding from the input's shape on every call; exported, that is a chain of Shape, Ceil, Clip
    and Pad nodes per convolution, which onnxruntime cannot fold and its INT8 quantizer
    quantizes (the pads came out wrong: 84% INT8 test accuracy against 97% fp32 on the digits).
    At a fixed input size the amounts are constants: each such convolution becomes a constant
    ``ZeroPad2d`` and a plain ``Conv2d`` with the same weights, the same arithmetic, which
    onnxruntime folds into the convolution's own padding. Other models come back unchanged.
    """
    same = [module for module in model.modules() if isinstance(module, Conv2dSame)]
    if not same:
        return model
    model = copy.deepcopy(model)
    sizes: dict[nn.Module, tuple[int, int]] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        sizes[module] = tuple(args[0].shape[-2:])

    hooks = [
        m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, Conv2dSame)
    ]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *input_size))
    finally:
        for hook in hooks:
            hook.remove()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2dSame):
                conv = nn.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    0,
                    child.dilation,
                    child.groups,
                    child.bias is not None,
                )
                conv.load_state_dict(child.state_dict())
                pad = pad_same_arg(
                    list(sizes[child]),
                    list(child.kernel_size),
                    list(child.stride),
                    list(child.dilation),
                )
                setattr(parent, name, nn.Sequential(nn.ZeroPad2d(pad), conv))
    return model.eval()


def read_metadata(onnx_path: Path) -> dict[str, Any]:
    """The model's metadata, with JSON values decoded."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    return decode_metadata({entry.key: entry.value for entry in proto.metadata_props})


@dataclass(frozen=True)
class Parity:
    """torch vs onnxruntime on the same images.

    ``max_relative_logit_diff`` is, over the images, the largest |Δ logit| of an image divided by
    that image's largest |logit| (at least 1): float32 error grows with the values computed, so
    a fine-tuned model with large logits differs by more in absolute terms, not in relative ones.
    """

    images: int
    max_abs_logit_diff: float
    max_relative_logit_diff: float
    top1_agreement: float

    def within(self, max_relative_logit: float, min_top1_agreement: float) -> bool:
        return (
            self.images > 0
            and self.max_relative_logit_diff <= max_relative_logit
            and self.top1_agreement >= min_top1_agreement
        )


def check_parity(torch_logits: np.ndarray, onnx_logits: np.ndarray) -> Parity:
    """Compare the two runtimes' logits on the same real images."""
    if torch_logits.shape != onnx_logits.shape or len(torch_logits) == 0:
        return Parity(len(torch_logits), float("inf"), float("inf"), 0.0)
    diff = np.abs(torch_logits.astype(np.float64) - onnx_logits.astype(np.float64)).max(axis=1)
    scale = np.maximum(np.abs(torch_logits.astype(np.float64)).max(axis=1), 1.0)
    return Parity(
        images=len(torch_logits),
        max_abs_logit_diff=float(diff.max()),
        max_relative_logit_diff=float((diff / scale).max()),
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
        return Parity(0, float("inf"), float("inf"), 0.0), np.empty((0, 0))
    onnx_all = np.concatenate(onnx_out)
    return check_parity(np.concatenate(torch_out), onnx_all), onnx_all
