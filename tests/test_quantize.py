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


def test_calibrating_a_few_images_per_run_gives_the_ranges_of_all_images_at_once(
    fp32_model, tmp_path
):
    """Memory is bounded by ``rows_per_run`` images' activations; the model is unchanged."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path, images = fp32_model
    prepared = tmp_path / "prepared.onnx"
    quant_pre_process(str(path), str(prepared))
    at_once = tmp_path / "at_once.onnx"
    quantize_static(
        str(prepared), str(at_once),
        _AllAtOnce({"pixels": np.ascontiguousarray(images)}),
        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
    )  # fmt: skip
    streamed = quantize_static_qdq(path, tmp_path / "streamed.onnx", [images], rows_per_run=3)
    np.testing.assert_array_equal(run(streamed, images), run(at_once, images))
    assert _scales(streamed) == _scales(at_once)


class _AllAtOnce:
    """onnxruntime's reference: one run over every calibration image."""

    def __init__(self, inputs: dict) -> None:
        self.inputs = [inputs]

    def get_next(self) -> dict | None:
        return self.inputs.pop() if self.inputs else None


def _scales(path: Path) -> dict[str, list[float]]:
    graph = onnx.load(str(path)).graph
    return {
        init.name: onnx.numpy_helper.to_array(init).ravel().tolist()
        for init in graph.initializer
        if init.name.endswith("_scale") or init.name.endswith("_zero_point")
    }
