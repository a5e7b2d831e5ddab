"""INT8 static quantization of an ONNX model with onnxruntime (QDQ format, per-channel weights).

Generic: any float32 ONNX model with one image-like input, calibrated on batches the caller
provides (real training images, preprocessed as the model expects). QDQ after
``quant_pre_process`` is the route that works for EfficientNet-style graphs; the QOperator
format fails on them ("Graph is not a DAG").
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from graft.errors import GraftError
from graft.files import replacing


class QuantizationError(GraftError):
    """A model could not be quantized as asked."""


class _Batches(CalibrationDataReader):
    """Feeds the calibration batches one by one under the model's input name."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}


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
    fp32_onnx: Path, out_path: Path, calibration_batches: Iterable[np.ndarray]
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

    Returns:
        ``out_path``.

    Raises:
        QuantizationError: if the model has several inputs or no calibration batch is given.
    """
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    batches = iter(calibration_batches)
    first = next(batches, None)
    if first is None:
        raise QuantizationError(
            f"No calibration batch was given for {fp32_onnx}: pass preprocessed training images."
        )
    reader = _Batches(input_name_of(fp32_onnx), itertools.chain([first], batches))
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
            )
    return out_path
