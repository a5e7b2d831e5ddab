"""INT8 static QDQ quantization of any one-input ONNX model, calibrated on real images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graft.backbones import create_backbone
from graft.preprocessing import eval_transform, load_tensor_batch
from graft.quantize import (
    Int8Gate,
    LabelledImages,
    QuantizationError,
    calibration_sample,
    float_head_nodes,
    quantize_static_qdq,
    quantize_with_gate,
)
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
        nodes_to_exclude=float_head_nodes(onnx.load(str(prepared))),
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


def test_the_calibration_sample_holds_every_class_in_proportion_and_is_stable():
    labels = np.repeat(np.arange(10), [116, 12, 100, 100, 50, 50, 50, 3, 1, 200])
    hashes = np.array([hashlib.sha256(str(i).encode()).hexdigest() for i in range(len(labels))])
    chosen = calibration_sample(labels, hashes, 128)
    assert len(chosen) == len(set(chosen)) == 128
    counts = np.bincount(labels[chosen], minlength=10)
    assert (counts >= 1).all()  # the class of one image too
    share = 128 * np.bincount(labels) / len(labels)
    assert np.abs(counts - share).max() < 1.5
    assert list(hashes[chosen]) == sorted(hashes[chosen])  # batches mix the classes
    # Each class's smallest hashes: more images in class 9 change another class's sample only
    # by its share (one set holds the other), never by swapping images.
    more = np.concatenate([labels, np.full(30, 9)])
    more_hashes = np.concatenate([hashes, [f"{i:064x}" for i in range(30)]])
    again = calibration_sample(more, more_hashes, 128)
    for label in range(9):
        before = set(hashes[chosen][labels[chosen] == label])
        after = set(more_hashes[again][more[again] == label])
        assert before <= after or after <= before
    np.testing.assert_array_equal(calibration_sample(labels, hashes, 128), chosen)


def test_the_classifier_stays_float_and_the_trunk_convolutions_are_int8(fp32_model, tmp_path):
    path, images = fp32_model
    out = quantize_static_qdq(path, tmp_path / "int8.onnx", [images[:10]])
    graph = onnx.load(str(out)).graph
    producers = {output: node for node in graph.node for output in node.output}
    (gemm,) = [node for node in graph.node if node.op_type == "Gemm"]
    weight = gemm.input[1]
    assert weight in {init.name for init in graph.initializer}  # a float weight, no DQ before it
    assert producers[gemm.input[0]].op_type != "DequantizeLinear"
    assert all(
        producers[name].op_type != "QuantizeLinear" for name in gemm.output if name in producers
    )
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert convs and all(producers[node.input[1]].op_type == "DequantizeLinear" for node in convs)
    assert set(float_head_nodes(onnx.load(str(path)))) >= {gemm.name}


def test_an_unknown_calibration_method_is_refused(fp32_model, tmp_path):
    path, images = fp32_model
    with pytest.raises(QuantizationError, match="minmax, percentile, entropy"):
        quantize_static_qdq(path, tmp_path / "int8.onnx", [images[:2]], method="mean")


@pytest.mark.parametrize("keep", [True, False])
def test_the_gate_keeps_or_refuses_and_a_refusal_names_the_worst_tensors(
    fp32_model, tmp_path, keep
):
    path, _ = fp32_model
    images = sorted((path.parent / "data").rglob("*.png"))
    labels = np.array([int(image.parent.name) for image in images])
    split = LabelledImages(images, labels)
    # Gates every model passes, and that none can (an accuracy drop below -1 is impossible).
    gate = (
        Int8Gate(1.0, 0.0, ("minmax", "percentile")) if keep else Int8Gate(-1.0, 0.0, ("minmax",))
    )
    transform = eval_transform(create_backbone("test_efficientnet", "random").data_config)
    out = tmp_path / "int8"
    decision = quantize_with_gate(path, out, images[:10], split, split, transform, gate)
    assert decision == json.loads((out / "decision.json").read_text())
    assert decision["kept"] is keep
    assert set(decision["calibration_methods_on_val"]) == set(gate.methods)
    assert decision["calibration_method"] in gate.methods
    assert (out / "model.onnx").is_file() is keep and len(list(out.iterdir())) == 1 + keep
    if not keep:
        assert "val accuracy" in decision["reason"] and "test accuracy" in decision["reason"]
        worst = decision["worst_activations"]
        graph = onnx.load(str(path)).graph
        names = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        assert worst and {row["tensor"] for row in worst} <= names
        assert [row["sqnr_db"] for row in worst] == sorted(row["sqnr_db"] for row in worst)
