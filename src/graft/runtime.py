"""The one onnxruntime session factory: export, evaluation, promotion, engines and serving.

NumPy and onnxruntime only, so the server (no torch) uses it too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def inference_session(
    model: Path | str | bytes, *, threads: int | None = None, quiet: bool = False
) -> ort.InferenceSession:
    """A CPU onnxruntime session over a model file or its bytes.

    Args:
        model: the ``.onnx`` file, or its bytes (read once by the caller).
        threads: intra-op threads (onnxruntime's default, one per physical core, when None).
        quiet: log errors only (warnings about unused initialisers are not a user's concern).
    """
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if quiet:
        options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_single(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """The single output of a single-input model for ``batch`` (float32, contiguous)."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
