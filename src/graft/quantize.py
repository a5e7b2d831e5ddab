"""INT8 static quantization of an ONNX model with onnxruntime (QDQ format, per-channel weights),
and the accuracy gate that decides whether the exported model's INT8 copy is kept.

:func:`quantize_static_qdq` is generic: any float32 ONNX model with one image-like input,
calibrated on batches the caller provides (real training images, preprocessed as the model
expects). QDQ after
``quant_pre_process`` is the route that works for EfficientNet-style graphs; the QOperator
format fails on them ("Graph is not a DAG").
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

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
    rows_per_run: int = CALIBRATION_ROWS_PER_RUN,
) -> Path:
    """Quantize ``fp32_onnx`` to INT8 (static, QDQ, per-channel weights) into ``out_path``.

    Activations are uint8 and weights int8 (the fast u8s8 kernels on x86), with ranges from
    min/max over the calibration batches. ``out_path`` is written through a temporary file, so
    it is either the complete quantized model or untouched.

    Args:
        fp32_onnx: the float32 model.
        out_path: where the quantized model goes.
        calibration_batches: float32 arrays shaped as the model's input (e.g. NCHW batches of
            preprocessed training images); a few hundred images are plenty.
        rows_per_run: images per calibration run, whose activations are all held at once
            (memory, not the result: the ranges are the same for any value).

    Returns:
        ``out_path``.

    Raises:
        QuantizationError: if the model has several inputs or no calibration batch is given.
    """
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    reader = _Batches(input_name_of(fp32_onnx), calibration_batches, rows_per_run)
    if not len(reader):
        raise QuantizationError(
            f"No calibration batch was given for {fp32_onnx}: pass preprocessed training images."
        )
    with tempfile.TemporaryDirectory(prefix="graft-quantize-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared))
        with replacing(out_path) as temporary:
            quantize_static(
                str(prepared),
                str(temporary),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"CalibStridedMinMax": 1},  # ranges merged after each run
            )
    return out_path


def quantize_with_gate(
    fp32_path: Path,
    int8_dir: Path,
    calibration_images: list[Path],
    test_images: list[Path],
    test_labels: np.ndarray,
    fp32_logits: np.ndarray,
    transform: Callable[[Image.Image], torch.Tensor],
    max_accuracy_drop: float,
    batch_size: int = 32,
) -> dict:
    """Quantize the exported model (static INT8 QDQ, calibrated on training images) and keep it
    as ``int8_dir/model.onnx`` only when its test accuracy is within ``max_accuracy_drop`` of
    fp32. ``int8_dir/decision.json`` always says what was decided and why."""
    batches = (
        load_tensor_batch(calibration_images[i : i + batch_size], transform).numpy()
        for i in range(0, len(calibration_images), batch_size)
    )
    staging = int8_dir.with_name(f".{int8_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    quantized = quantize_static_qdq(fp32_path, staging / "model.onnx", batches)
    session = inference_session(quantized)
    int8_logits = np.concatenate(
        [
            run_single(
                session, load_tensor_batch(test_images[i : i + batch_size], transform).numpy()
            )
            for i in range(0, len(test_images), batch_size)
        ]
    )  # one decoded batch at a time
    fp32_accuracy = float((fp32_logits.argmax(1) == test_labels).mean())
    int8_accuracy = float((int8_logits.argmax(1) == test_labels).mean())
    kept = fp32_accuracy - int8_accuracy <= max_accuracy_drop
    decision = {
        "kept": kept,
        "fp32_test_accuracy": fp32_accuracy,
        "int8_test_accuracy": int8_accuracy,
        "max_accuracy_drop": max_accuracy_drop,
        "calibration_images": len(calibration_images),
        "top1_agreement_with_fp32": float((int8_logits.argmax(1) == fp32_logits.argmax(1)).mean()),
        "size_ratio": fp32_path.stat().st_size / quantized.stat().st_size,
        "reason": (
            "within the allowed accuracy drop"
            if kept
            else f"test accuracy {int8_accuracy:.4f} is more than {max_accuracy_drop:.4f} below "
            f"fp32's {fp32_accuracy:.4f}: the INT8 model was not kept"
        ),
    }
    if not kept:
        quantized.unlink()
    write_json(staging / "decision.json", decision)
    shutil.rmtree(int8_dir, ignore_errors=True)
    os.replace(staging, int8_dir)
    return decision
