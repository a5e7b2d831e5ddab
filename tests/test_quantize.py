"""INT8 static QDQ quantization of any one-input ONNX model, calibrated on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graft.backbones import create_backbone
from graft.preprocessing import eval_transform, load_tensor_batch
from graft.quantize import QuantizationError, quantize_static_qdq
from graft.sample_data import write_sample_data


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A tiny classifier exported with an input name of its own, and real digit batches."""
    folder = tmp_path_factory.mktemp("quantize")
    write_sample_data(folder / "data", per_class=3)
    backbone = create_backbone("test_efficientnet", "random", num_classes=10)
    images = load_tensor_batch(
        sorted((folder / "data").rglob("*.png")), eval_transform(backbone.data_config)
    )
    path = folder / "model.onnx"
    torch.onnx.export(
        backbone.model, (images[:1],), str(path), input_names=["pixels"],
        output_names=["logits"], dynamic_axes={"pixels": {0: "n"}, "logits": {0: "n"}},
        opset_version=17, dynamo=False,
    )  # fmt: skip
    return path, images.numpy()


def run(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": images})[0]


def test_the_quantized_model_is_int8_qdq_and_tracks_the_float_model(fp32_model, tmp_path):
    path, images = fp32_model
    out = quantize_static_qdq(path, tmp_path / "int8.onnx", [images[:10], images[10:20]])
    assert out == tmp_path / "int8.onnx"
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    reference, quantized = run(path, images), run(out, images)
    assert quantized.shape == reference.shape
    correlation = np.corrcoef(reference.ravel(), quantized.ravel())[0, 1]
    assert correlation > 0.9, correlation
    assert out.stat().st_size < path.stat().st_size
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file


def test_no_calibration_data_is_a_clear_error_and_writes_nothing(fp32_model, tmp_path):
    path, _ = fp32_model
    with pytest.raises(QuantizationError, match="No calibration batch"):
        quantize_static_qdq(path, tmp_path / "int8.onnx", [])
    assert not list(tmp_path.iterdir())
