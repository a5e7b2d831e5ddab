"""INT8 static quantization of an ONNX model with onnxruntime (QDQ format, per-channel weights),
and the accuracy gate that decides whether the exported model's INT8 copy is kept.

:func:`quantize_static_qdq` is generic: any float32 ONNX model with one image-like input,
calibrated on batches the caller provides (real training images, preprocessed as the model
expects, chosen by :func:`calibration_sample`). QDQ after ``quant_pre_process`` is the route that
works for EfficientNet-style graphs; the QOperator format fails on them ("Graph is not a DAG").
onnxruntime fuses each DequantizeLinear -> Conv -> QuantizeLinear into one int8 ``QLinearConv``.

The classifier stays in float: the global pooling and everything after it (the Linear that gives
the calibrated logits, any head or test-time averaging) are excluded, so only the trunk's
convolutions are quantized. When that loses too much on val, :func:`quantize_with_gate` keeps
the trunk's first units (stem, first blocks: :func:`trunk_units`) in float as well, as few as
pass on val: their error is the one the rest of the trunk amplifies.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.qdq_loss_debug import (
    collect_activations,
    compute_activation_error,
    create_activation_matching,
    modify_model_output_intermediate_tensors,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

from graft.errors import GraftError
from graft.files import replacing, write_json
from graft.preprocessing import load_tensor_batch
from graft.runtime import inference_session, run_single

# Images per calibration run, whose every activation the calibrator holds at once: quantizing
# tf_efficientnet_lite0 (224 px, 32 images) peaked at 1.8 GB resident with 8 a run and 1.1 GB
# with 2, in the same time and to the same bytes (measured).
CALIBRATION_ROWS_PER_RUN = 2


class QuantizationError(GraftError):
    """A model could not be quantized as asked."""


CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
_POOLING_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool"})
_WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def calibration_sample(labels: np.ndarray, hashes: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` images to calibrate on: every class in proportion, by content hash.

    Each class gets its share of ``count`` (largest remainders round up; every class at least one
    image when ``count`` allows it), filled with its images of smallest content hash, so the
    choice is stable: new images elsewhere change a class's sample only by its share, never
    swap its images. The indices come back in hash order, so any batch of them mixes classes.

    Args:
        labels: one class per image.
        hashes: one content hash (sha256 hex) per image.
        count: how many images; all of them when there are fewer.
    """
    labels, hashes = np.asarray(labels), np.asarray(hashes).astype(str)
    if labels.shape != hashes.shape:
        raise ValueError(f"{len(labels)} labels but {len(hashes)} hashes")
    count = min(int(count), len(labels))
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    classes, sizes = np.unique(labels, return_counts=True)
    exact = count * sizes / sizes.sum()
    quota = np.floor(exact).astype(np.int64)
    if count >= len(classes):
        quota = np.maximum(quota, 1)
    for position in np.argsort(-(exact - quota), kind="stable")[: count - quota.sum()]:
        quota[position] += 1
    while quota.sum() > count:  # the minimum of one overshot: the most over its share gives one
        quota[np.argmax(np.where(quota > 1, quota - exact, -np.inf))] -= 1
    chosen = np.concatenate(
        [
            members[np.argsort(hashes[members], kind="stable")][:share]
            for members, share in zip(
                (np.flatnonzero(labels == label) for label in classes), quota, strict=True
            )
        ]
    )
    return chosen[np.argsort(hashes[chosen], kind="stable")]


def float_head_nodes(model: onnx.ModelProto) -> list[str]:
    """The names of the nodes that stay float: the global pooling and everything after it.

    Without a global pooling node, the Gemm/MatMul nodes (a classifier on flat features).
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    head = [node for node in model.graph.node if node.op_type in _POOLING_OPS]
    if not head:
        head = [node for node in model.graph.node if node.op_type in {"Gemm", "MatMul"}]
    seen: dict[str, None] = {}
    while head:
        node = head.pop()
        if node.name in seen:
            continue
        seen[node.name] = None
        head.extend(consumer for output in node.output for consumer in consumers.get(output, []))
    return sorted(seen)


def trunk_units(model: onnx.ModelProto) -> list[tuple[str, list[str]]]:
    """The quantized part of ``model`` in units, in order from the input: ``(unit, node names)``.

    A unit is a module of the exported network, read from the node names torch gives
    (``/blocks/blocks.1/blocks.1.0/conv_pw/Conv``): the outermost module, followed down through
    its numbered children (``blocks`` -> ``blocks.1`` -> ``blocks.1.0``), i.e. the stem, each
    block of a stage, the head convolution. A module without a weighted op (an activation, a
    padding) joins the unit before it (the first one, the unit after it). The float head
    (:func:`float_head_nodes`) is not part of the trunk.
    """
    head = set(float_head_nodes(model))
    grouped: dict[str, list[onnx.NodeProto]] = {}
    for index, node in enumerate(model.graph.node):
        if node.name not in head and node.op_type != "Constant":
            grouped.setdefault(_module_of(node.name) or f"#{index}", []).append(node)
    units: list[tuple[str, list[str]]] = []
    waiting: list[str] = []  # nodes of weightless modules before the first weighted one
    for name, nodes in grouped.items():
        names = [node.name for node in nodes]
        if any(node.op_type in _WEIGHTED_OPS for node in nodes):
            units.append((name, waiting + names))
            waiting = []
        elif units:
            units[-1][1].extend(names)
        else:
            waiting.extend(names)
    if waiting:
        units.append(("(input)", waiting))
    return units


def _module_of(node_name: str) -> str:
    """``/blocks/blocks.1/blocks.1.0/conv_pw/Conv`` -> ``/blocks/blocks.1/blocks.1.0``."""
    modules = [part for part in node_name.split("/") if part][:-1]
    if not modules:
        return ""
    chain = modules[:1]
    for module in modules[1:]:
        if not module.startswith(chain[-1] + "."):
            break
        chain.append(module)
    return "/" + "/".join(chain)


class _Batches(CalibrationDataReader):
    """Feeds the calibration images under the model's input name, ``rows`` images per run.

    onnxruntime's MinMax calibrator keeps every activation of every run it has made until it
    computes the ranges (gigabytes for an EfficientNet at 224 px over a hundred images). Run with
    ``CalibStridedMinMax``, it computes and merges the ranges after each window that
    :meth:`set_range` selects, so only one window's activations are held at a time; minima and
    maxima merge exactly, so the ranges are those of all images at once.
    """

    def __init__(self, input_name: str, batches: Iterable[np.ndarray], rows: int) -> None:
        self.input_name = input_name
        self.chunks = [
            np.ascontiguousarray(batch[start : start + rows], dtype=np.float32)
            for batch in batches
            for start in range(0, len(batch), rows)
        ]
        self.window: Iterator[np.ndarray] = iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.window = iter(self.chunks[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self.window, None)
        return None if chunk is None else {self.input_name: chunk}


def input_name_of(model_path: Path) -> str:
    """The name of the model's single graph input (initializers excluded)."""
    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value.name for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise QuantizationError(
            f"{model_path} has {len(inputs)} inputs ({', '.join(inputs)}); "
            "quantize_static_qdq calibrates models with exactly one input."
        )
    return inputs[0]


def quantize_static_qdq(
    fp32_onnx: Path,
    out_path: Path,
    calibration_batches: Iterable[np.ndarray],
    *,
    method: str = "minmax",
    rows_per_run: int = CALIBRATION_ROWS_PER_RUN,
    float_units: int = 0,
    ranges_cache: Path | None = None,
) -> Path:
    """Quantize ``fp32_onnx`` to INT8 (static, QDQ, per-channel weights) into ``out_path``.

    Activations are uint8 and weights int8 (the fast u8s8 kernels on x86), with ranges fitted by
    ``method`` to the calibration activations; the global pooling and what follows it stay
    float (:func:`float_head_nodes`). The model's metadata is kept. ``out_path`` is written
    through a temporary file, so it is either the complete quantized model or untouched.

    Args:
        fp32_onnx: the float32 model.
        out_path: where the quantized model goes.
        calibration_batches: float32 arrays shaped as the model's input (e.g. NCHW batches of
            preprocessed training images, see :func:`calibration_sample`); a few hundred images
            are plenty.
        method: ``minmax``, ``percentile`` (99.999th) or ``entropy``: how activation ranges
            are fitted (histograms are merged run by run, like minima and maxima).
        rows_per_run: images per calibration run, whose activations are all held at once
            (memory, not the result: the ranges are the same for any value).
        float_units: the trunk's first units (:func:`trunk_units`) that also stay float: no
            QuantizeLinear/DequantizeLinear in them, their convolutions run in fp32.
        ranges_cache: a file for the calibrated ranges: written by the first call, read by a
            later one instead of calibrating again (the same model, images and method are the
            caller's to ensure; the ranges do not depend on ``float_units``). With an
            onnxruntime whose ``quantize_static`` lacks ``calibration_cache_path``, every call
            calibrates (the same result, slower).

    Returns:
        ``out_path``.

    Raises:
        QuantizationError: if the model has several inputs, no calibration batch is given or
            the method is unknown.
    """
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if method not in CALIBRATION_METHODS:
        raise QuantizationError(
            f"Unknown calibration method {method!r}: choose {', '.join(CALIBRATION_METHODS)}."
        )
    reader = _Batches(input_name_of(fp32_onnx), calibration_batches, rows_per_run)
    if not len(reader):
        raise QuantizationError(
            f"No calibration batch was given for {fp32_onnx}: pass preprocessed training images."
        )
    with tempfile.TemporaryDirectory(prefix="graft-quantize-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared))
        graph = onnx.load(str(prepared), load_external_data=False)
        keep_float = float_head_nodes(graph) + [
            name for _, names in trunk_units(graph)[:float_units] for name in names
        ]
        with replacing(out_path) as temporary:
            quantize_static(
                str(prepared),
                str(temporary),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CALIBRATION_METHODS[method],
                nodes_to_exclude=keep_float,
                extra_options={"CalibStridedMinMax": 1},  # ranges merged after each run
                **(
                    {"calibration_cache_path": str(ranges_cache)}
                    if ranges_cache is not None and _HAS_RANGES_CACHE
                    else {}
                ),
            )
    return out_path


# Recent onnxruntime (1.32 here) keeps the calibrated ranges in a file if asked: on eurosat-dev a
# candidate with float units quantized in 1.2 s from the file instead of 14 s calibrating, to the
# same bytes (measured).
_HAS_RANGES_CACHE = "calibration_cache_path" in inspect.signature(quantize_static).parameters


@dataclass(frozen=True)
class Int8Gate:
    """When an INT8 model is kept (``export.int8_*`` in params.yaml)."""

    max_accuracy_drop: float
    min_top1_agreement: float
    methods: Sequence[str] = ("minmax", "percentile", "entropy")
    max_float_units: int = 0

    def passes_on_val(self, scores: dict[str, float], fp32_accuracy: float) -> bool:
        """The gate's own limits, applied to val (agreement included): a candidate to choose."""
        return bool(
            fp32_accuracy - scores["accuracy"] <= self.max_accuracy_drop
            and scores["top1_agreement"] >= self.min_top1_agreement
        )


@dataclass(frozen=True)
class LabelledImages:
    paths: Sequence[Path]
    labels: np.ndarray


def quantize_with_gate(
    fp32_path: Path,
    int8_dir: Path,
    calibration_images: Sequence[Path],
    val: LabelledImages,
    test: LabelledImages,
    transform: Callable[[Image.Image], torch.Tensor],
    gate: Int8Gate,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Quantize the exported model and keep it as ``int8_dir/model.onnx`` only if it holds up.

    The candidates are chosen on **val**, never on test. First the calibration methods of
    ``gate`` quantize the whole trunk, in their order, until one passes the gate's limits on val
    (accuracy within ``gate.max_accuracy_drop`` of fp32's, agreement at least
    ``gate.min_top1_agreement``): that one is the choice. If none does, the one agreeing best
    with fp32 on val (then the most accurate there, then the first listed) quantizes again with
    the trunk's first 1, 2, ... ``gate.max_float_units`` units (:func:`trunk_units`) kept
    float, stopping at the first that passes on val (mixed precision: the fewest float units
    that suffice); when none does, the best on val is taken and the gate refuses it.

    The chosen model is kept when, on val and on test, its accuracy is within
    ``gate.max_accuracy_drop`` of fp32's, and its top-1 agreement with fp32 on test is at least
    ``gate.min_top1_agreement``. ``int8_dir/decision.json`` always says what was decided and
    why, with every candidate's val figures; on a refusal it names the activations that lost
    most (SQNR against the float model on a few val images), the place to look next.
    """
    fp32_path, int8_dir = Path(fp32_path), Path(int8_dir)
    splits = {"val": val, "test": test}

    def logits_of(model: Path, split: str) -> np.ndarray:  # one decoded batch at a time
        session, paths = inference_session(model), splits[split].paths
        outputs = [
            run_single(session, load_tensor_batch(paths[i : i + batch_size], transform).numpy())
            for i in range(0, len(paths), batch_size)
        ]
        return np.concatenate(outputs) if outputs else np.empty((0, 0), np.float32)

    fp32_logits = {name: logits_of(fp32_path, name) for name in splits}
    fp32_accuracy = {
        name: _scores(fp32_logits[name], fp32_logits[name], split.labels)["accuracy"]
        for name, split in splits.items()
    }
    staging = int8_dir.with_name(f".{int8_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    units = [name for name, _ in trunk_units(onnx.load(str(fp32_path), load_external_data=False))]
    candidates: list[dict[str, Any]] = []
    calibration = [  # decoded once: the calibration holds them all at once anyway
        load_tensor_batch(calibration_images[i : i + batch_size], transform).numpy()
        for i in range(0, len(calibration_images), batch_size)
    ]

    def candidate(method: str, float_units: int) -> dict[str, Any]:
        path = staging / f"{method}-{float_units}.onnx"
        quantize_static_qdq(
            fp32_path,
            path,
            calibration,
            method=method,
            float_units=float_units,
            ranges_cache=staging / f"{method}.ranges.json",
        )
        scores = _scores(logits_of(path, "val"), fp32_logits["val"], val.labels)
        row = {
            "method": method,
            "float_units": float_units,
            **scores,
            "passes_on_val": gate.passes_on_val(scores, fp32_accuracy["val"]),
            "path": path,
        }
        candidates.append(row)
        return row

    def best(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
        return max(
            rows,
            key=lambda r: (
                r["top1_agreement"],
                r["accuracy"],
                -r["float_units"],
                -gate.methods.index(r["method"]),
            ),
        )

    for method in gate.methods:  # the first that passes on val ends the search
        if candidate(method, 0)["passes_on_val"]:
            break
    chosen = best(candidates)
    method, most = (
        chosen["method"],
        min(gate.max_float_units, len(units) - 1) if len(val.paths) else 0,
    )
    for float_units in range(1, most + 1):
        if chosen["passes_on_val"]:
            break
        row = candidate(method, float_units)
        chosen = row if row["passes_on_val"] else best(candidates)
    quantized = staging / "model.onnx"
    os.replace(chosen["path"], quantized)
    scores = {
        "val": {key: chosen[key] for key in ("accuracy", "top1_agreement")},
        "test": _scores(logits_of(quantized, "test"), fp32_logits["test"], test.labels),
    }
    problems = [
        f"no {name} images to compare with fp32 on"
        for name in splits
        if not len(splits[name].paths)
    ]
    problems += [
        f"{name} accuracy {scores[name]['accuracy']:.4f} is more than "
        f"{gate.max_accuracy_drop:.4f} below fp32's {fp32_accuracy[name]:.4f}"
        for name in ("val", "test")
        if fp32_accuracy[name] - scores[name]["accuracy"] > gate.max_accuracy_drop
    ]
    if scores["test"]["top1_agreement"] < gate.min_top1_agreement:
        problems.append(
            f"top-1 agreement with fp32 on test {scores['test']['top1_agreement']:.4f} is below "
            f"{gate.min_top1_agreement}"
        )
    kept = not problems
    decision: dict[str, Any] = {
        "kept": kept,
        "fp32_test_accuracy": fp32_accuracy["test"],
        "int8_test_accuracy": scores["test"]["accuracy"],
        "top1_agreement_with_fp32": scores["test"]["top1_agreement"],
        "fp32_val_accuracy": fp32_accuracy["val"],
        "int8_val_accuracy": scores["val"]["accuracy"],
        "val_top1_agreement_with_fp32": scores["val"]["top1_agreement"],
        "max_accuracy_drop": gate.max_accuracy_drop,
        "min_top1_agreement": gate.min_top1_agreement,
        "calibration_images": len(calibration_images),
        "calibration_method": chosen["method"],
        "calibration_methods_on_val": {
            row["method"]: {key: row[key] for key in ("accuracy", "top1_agreement")}
            for row in candidates
            if row["float_units"] == 0
        },
        "float_units": units[: chosen["float_units"]],
        "trunk_units": len(units),
        "candidates_on_val": [
            {key: value for key, value in row.items() if key != "path"} for row in candidates
        ],
        "size_ratio": fp32_path.stat().st_size / quantized.stat().st_size,
        "reason": (
            f"within {gate.max_accuracy_drop} accuracy of fp32 on val and test, agreeing on "
            f"{scores['test']['top1_agreement']:.2%} of test (calibration: {chosen['method']}, "
            f"{_float_units_text(chosen['float_units'], len(units))}, chosen on val)"
            if kept
            else "; ".join(problems) + ": the INT8 model was not kept"
        ),
    }
    if not kept:
        few = list(val.paths[:EXPLAIN_IMAGES] or test.paths[:EXPLAIN_IMAGES])
        decision["worst_activations"] = worst_activations(
            fp32_path, quantized, load_tensor_batch(few, transform).numpy()
        )
        decision["reason"] += (
            "; worst_activations names the tensors that lost most (SQNR in dB against fp32 on "
            f"{len(few)} val images)"
        )
    for leftover in [*staging.glob("*.onnx"), *staging.glob("*.ranges.json")]:
        if leftover != quantized or not kept:
            leftover.unlink()
    write_json(staging / "decision.json", decision)
    shutil.rmtree(int8_dir, ignore_errors=True)
    os.replace(staging, int8_dir)
    return decision


EXPLAIN_IMAGES = 8


def _float_units_text(count: int, total: int) -> str:
    if not count:
        return "every trunk unit int8"
    return f"the first {count} of {total} trunk units float"


def worst_activations(
    fp32_path: Path, int8_path: Path, images: np.ndarray, top: int = 8
) -> list[dict[str, Any]]:
    """The ``top`` activations of the INT8 model furthest from the float model's on ``images``.

    Each entry: ``tensor`` and the ``node`` that computes it, ``sqnr_db`` (signal-to-noise of
    the INT8 model's activation against the float model's: the error accumulated up to there)
    and ``local_sqnr_db`` (of its own quantize-dequantize step; where a ReLU6's Clip was folded
    into the quantization, it compares with the unclipped value and is low by construction),
    lowest ``sqnr_db`` first.
    Measured with onnxruntime's ``qdq_loss_debug``.
    """
    with tempfile.TemporaryDirectory(prefix="graft-qdq-debug-") as folder:
        activations = {}
        for name, path in (("float", fp32_path), ("int8", int8_path)):
            augmented = Path(folder) / f"{name}.onnx"
            modify_model_output_intermediate_tensors(str(path), str(augmented))
            reader = _Batches(input_name_of(path), [images], len(images))
            activations[name] = collect_activations(str(augmented), reader)
    errors = compute_activation_error(
        create_activation_matching(activations["int8"], activations["float"])
    )
    producers = {
        output: node.name
        for node in onnx.load(str(int8_path), load_external_data=False).graph.node
        for output in node.output
    }
    rows = [
        {
            "tensor": tensor,
            "node": producers.get(tensor, ""),
            "sqnr_db": round(float(error["xmodel_err"]), 2),
            "local_sqnr_db": round(float(error["qdq_err"]), 2),
        }
        for tensor, error in errors.items()
        if "xmodel_err" in error and np.isfinite(error["xmodel_err"])
    ]
    return sorted(rows, key=lambda row: row["sqnr_db"])[:top]


def _scores(logits: np.ndarray, fp32_logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and top-1 agreement with fp32; NaN without images (every comparison fails)."""
    if len(labels) == 0:
        return {"accuracy": float("nan"), "top1_agreement": float("nan")}
    predicted = logits.argmax(1)
    return {
        "accuracy": float((predicted == labels).mean()),
        "top1_agreement": float((predicted == fp32_logits.argmax(1)).mean()),
    }
