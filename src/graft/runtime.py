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


# onnxruntime keeps a run's activations in its memory arena, which grows with the images per run
# (tf_efficientnet_lite0 at 224 px: about 10 MB an image, measured). Runners that have the
# model (graft.engines) slice a batch by a budget for those activations (features.run_memory_mb);
# with a session only, a run takes at most this many pixels: 16 images at 224 px.
MAX_PIXELS_PER_RUN = 16 * 224 * 224


def rows_per_run(input_size: tuple[int, ...] | list[int], max_pixels: int) -> int:
    """Images of ``input_size`` (..., H, W) that one run takes (at least one)."""
    return max(1, max_pixels // (input_size[-1] * input_size[-2]))


def slice_rows(images: int, rows: int) -> int:
    """Images a run takes when ``images`` run ``rows`` at a time at most, in slices of equal size.

    64 images at 39 a run go as 32 + 32, not 39 + 25: no short last run (a run of few images
    keeps onnxruntime's threads less busy), and the arena never grows past what a slice needs.
    """
    if images <= rows:
        return max(images, 1)
    runs = -(-images // rows)
    return -(-images // runs)


def run_single(
    session: ort.InferenceSession, batch: np.ndarray, *, rows: int | None = None
) -> np.ndarray:
    """The single output of a single-input model for ``batch`` (float32, contiguous).

    A batch of more than ``rows`` images (by default: :data:`MAX_PIXELS_PER_RUN` worth; see
    :func:`graft.engines.rows_for_budget` for a model's own) runs in slices, so the session's
    memory stays that of one slice; the outputs are the same.
    """
    name = session.get_inputs()[0].name
    array = np.ascontiguousarray(batch, dtype=np.float32)
    if rows is None:  # images (N, C, H, W) by their pixels; anything else in one run
        rows = rows_per_run(array.shape, MAX_PIXELS_PER_RUN) if array.ndim == 4 else len(array)
    if len(array) <= rows:
        return session.run(None, {name: array})[0]
    size = slice_rows(len(array), rows)
    return np.concatenate(
        [
            session.run(None, {name: array[start : start + size]})[0]
            for start in range(0, len(array), size)
        ]
    )
