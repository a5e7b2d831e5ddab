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
from graft.preprocessing import eval_transform, load_rgb, load_tensor_batch
from graft.quantize import (
    _HAS_RANGES_CACHE,
    Int8Gate,
    LabelledImages,
    QuantizationError,
    calibration_sample,
    float_head_nodes,
    quantize_static_qdq,
    quantize_with_gate,
    trunk_units,
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
        Int8Gate(1.0, 0.0, ("minmax", "percentile"))
        if keep
        else Int8Gate(-1.0, 0.0, ("minmax", "percentile"))
    )
    transform = eval_transform(create_backbone("test_efficientnet", "random").data_config)
    out = tmp_path / "int8"
    decision = quantize_with_gate(path, out, images[:10], split, split, transform, gate)
    assert decision == json.loads((out / "decision.json").read_text())
    assert decision["kept"] is keep
    # A gate every model passes stops at the first method; one none passes tries them all.
    assert list(decision["calibration_methods_on_val"]) == (
        ["minmax"] if keep else list(gate.methods)
    )
    assert decision["calibration_method"] in decision["calibration_methods_on_val"]
    assert (out / "model.onnx").is_file() is keep and len(list(out.iterdir())) == 1 + keep
    if not keep:
        assert "val accuracy" in decision["reason"] and "test accuracy" in decision["reason"]
        worst = decision["worst_activations"]
        graph = onnx.load(str(path)).graph
        names = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        assert worst and {row["tensor"] for row in worst} <= names
        assert [row["sqnr_db"] for row in worst] == sorted(row["sqnr_db"] for row in worst)


def test_the_first_trunk_units_asked_for_stay_float_and_the_rest_is_int8(fp32_model, tmp_path):
    path, images = fp32_model
    units = trunk_units(onnx.load(str(path)))
    assert [name for name, _ in units[:2]] == ["/conv_stem", "/blocks/blocks.0/blocks.0.0"]
    assert units[-1][0] == "/conv_head"  # the float head (pooling, classifier) is not a unit
    out = quantize_static_qdq(path, tmp_path / "int8.onnx", [images[:10]], float_units=2)
    float_nodes, int8_nodes = _float_and_int8_convs(out)
    assert float_nodes == {n for _, names in units[:2] for n in names if n.endswith("/Conv")}
    assert int8_nodes == {n for _, names in units[2:] for n in names if n.endswith("/Conv")}
    np.testing.assert_allclose(run(out, images[:4]), run(path, images[:4]), atol=5.0)


def _float_and_int8_convs(path: Path) -> tuple[set[str], set[str]]:
    """Convolutions with no DequantizeLinear on any input (float), and with one on each.

    Between float convolutions there is no QuantizeLinear either: only the last float unit's
    output is quantized, for the int8 unit that reads it.
    """
    graph = onnx.load(str(path)).graph
    producers = {output: node for node in graph.node for output in node.output}
    dequantized = {
        node.name: [
            name in producers and producers[name].op_type == "DequantizeLinear"
            for name in node.input[:2]
        ]
        for node in graph.node
        if node.op_type == "Conv"
    }
    float_nodes = {name for name, inputs in dequantized.items() if not any(inputs)}
    for node in graph.node:
        if node.name in float_nodes:  # its float input comes straight from its float producer
            producer = producers.get(node.input[0])
            assert producer is None or producer.op_type not in {"DequantizeLinear"}
    return float_nodes, {name for name, inputs in dequantized.items() if all(inputs)}


class _SignOfBrightness(torch.nn.Module):
    """Two classes: image brightness above or below ``threshold``, read off a channel that
    per-tensor INT8 destroys. ``blocks.0`` puts the signal 1e-6 of the brightness beside a copy
    1e3 times it (one uint8 range for both: the signal quantizes to zero), then rescales it;
    in float, ``blocks.0`` hands ``blocks.1`` a well-scaled signal."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.blocks = torch.nn.Sequential(_Block(1), _Block(2))
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.classifier = torch.nn.Linear(2, 2)
        with torch.no_grad():
            first, second = self.blocks
            first.conv_a.weight.copy_(torch.tensor([1e3, 1e-6]).view(2, 1, 1, 1))
            first.conv_a.bias.copy_(torch.tensor([0.0, -1e-6 * threshold]))
            first.conv_b.weight.copy_(torch.tensor([[0.0, 1e6], [0.0, -1e6]]).view(2, 2, 1, 1))
            second.conv_a.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            second.conv_b.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            for block in self.blocks:
                block.conv_b.bias.zero_()
            second.conv_a.bias.zero_()
            self.classifier.weight.copy_(torch.eye(2))
            self.classifier.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.blocks(x)).flatten(1))


class _Block(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_a = torch.nn.Conv2d(channels, 2, 1)
        self.conv_b = torch.nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_b(self.conv_a(x))


def _grey(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("L").resize((8, 8)), np.float32) / 255)[None]


@pytest.fixture(scope="module")
def sensitive_model(tmp_path_factory) -> tuple[Path, list[Path], np.ndarray]:
    """A model whose all-int8 copy must fail the gate, with images labelled by its own answers."""
    folder = tmp_path_factory.mktemp("sensitive")
    write_sample_data(folder / "data", per_class=2)
    images = sorted((folder / "data").rglob("*.png"))
    means = np.sort([float(_grey(load_rgb(image)).mean()) for image in images])
    middle = len(means) // 2  # the widest gap near the middle: no image near the tie
    gaps = np.diff(means)[middle - 3 : middle + 3]
    split = middle - 3 + int(np.argmax(gaps))
    model = _SignOfBrightness(float(means[split : split + 2].mean())).eval()
    path = folder / "model.onnx"
    batch = load_tensor_batch(images, _grey)
    torch.onnx.export(
        model, (batch[:1],), str(path), input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    labels = run_named(path, batch.numpy()).argmax(1)
    assert 0.3 < labels.mean() < 0.7  # both classes
    return path, images, labels


def run_named(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def test_a_trunk_too_sensitive_for_int8_keeps_its_first_unit_float_chosen_on_val(
    sensitive_model, tmp_path
):
    path, images, labels = sensitive_model
    split = LabelledImages(images, labels)
    gate = Int8Gate(0.005, 0.99, ("minmax", "percentile"), max_float_units=4)
    decision = quantize_with_gate(path, tmp_path / "int8", images, split, split, _grey, gate)
    candidates = decision["candidates_on_val"]
    # Every method fails with the whole trunk int8; the first unit float passes and is kept.
    assert [(c["method"], c["float_units"], c["passes_on_val"]) for c in candidates] == [
        ("minmax", 0, False),
        ("percentile", 0, False),
        ("minmax", 1, True),
    ]
    assert candidates[0]["top1_agreement"] < 0.9
    assert decision["kept"] and decision["float_units"] == ["/blocks/blocks.0"]
    assert decision["trunk_units"] == 2 and decision["top1_agreement_with_fp32"] >= 0.99
    float_nodes, int8_nodes = _float_and_int8_convs(tmp_path / "int8" / "model.onnx")
    assert float_nodes == {"/blocks/blocks.0/conv_a/Conv", "/blocks/blocks.0/conv_b/Conv"}
    assert int8_nodes == {"/blocks/blocks.1/conv_a/Conv", "/blocks/blocks.1/conv_b/Conv"}
    assert decision == json.loads((tmp_path / "int8" / "decision.json").read_text())
    # The test split's labels play no part in the choice.
    relabelled = quantize_with_gate(
        path, tmp_path / "again", images, split, LabelledImages(images, 1 - labels), _grey, gate
    )
    assert relabelled["candidates_on_val"] == candidates
    assert relabelled["float_units"] == decision["float_units"]
    assert relabelled["fp32_test_accuracy"] == 0.0  # the test figures did see the new labels


def test_without_float_units_allowed_the_sensitive_trunk_is_refused_with_its_figures(
    sensitive_model, tmp_path
):
    path, images, labels = sensitive_model
    split = LabelledImages(images, labels)
    gate = Int8Gate(0.005, 0.99, ("minmax",), max_float_units=0)
    decision = quantize_with_gate(path, tmp_path / "int8", images, split, split, _grey, gate)
    assert not decision["kept"] and decision["float_units"] == []
    assert [c["float_units"] for c in decision["candidates_on_val"]] == [0]
    assert "every trunk unit int8" not in decision["reason"]  # a refusal says what lost instead
    assert decision["worst_activations"]


@pytest.mark.skipif(not _HAS_RANGES_CACHE, reason="this onnxruntime cannot keep ranges in a file")
def test_ranges_kept_in_a_file_quantize_to_the_same_model_as_calibrating_again(
    fp32_model, tmp_path
):
    path, images = fp32_model
    ranges = tmp_path / "minmax.ranges.json"
    quantize_static_qdq(path, tmp_path / "first.onnx", [images[:10]], ranges_cache=ranges)
    assert ranges.is_file()
    cached = quantize_static_qdq(
        path, tmp_path / "cached.onnx", [images[:10]], float_units=2, ranges_cache=ranges
    )
    fresh = quantize_static_qdq(path, tmp_path / "fresh.onnx", [images[:10]], float_units=2)
    assert cached.read_bytes() == fresh.read_bytes()
