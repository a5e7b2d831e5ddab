"""Engines that run a frozen torch module over image batches: torch itself, or onnxruntime.

On CPU, onnxruntime runs tf_efficientnet_lite0 several times faster than torch eager (7.7x
measured here at batch 64, 2 threads), so ``auto`` picks it there and torch on CUDA. The module
is exported to ONNX (well under a second with the TorchScript exporter), either for the run or
once into a cache file that later runs load, and the session is warmed at the batch size it will
run, since its first run at a new size is slow.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

from graft.export import export_onnx
from graft.runtime import inference_session, run_single, slice_rows

Engine = Literal["auto", "torch", "onnxruntime"]
Runner = Callable[[torch.Tensor], np.ndarray]

_INPUT, _OUTPUT = "x", "y"

# The default budget for one onnxruntime run's activations (``features.run_memory_mb``): 64
# images of tf_efficientnet_lite0 at 224 px (9.7 MB each) fit; a larger model or input runs fewer.
RUN_MEMORY_MB = 768


def resolve_engine(engine: Engine) -> Literal["torch", "onnxruntime"]:
    if engine == "auto":
        return "torch" if torch.cuda.is_available() else "onnxruntime"
    return engine


def make_runner(
    module: nn.Module,
    input_size: list[int] | tuple[int, ...],
    batch_size: int,
    engine: Engine,
    *,
    onnx_path: Path | None = None,
    threads: int | None = None,
    run_memory_mb: float = RUN_MEMORY_MB,
) -> Runner:
    """A callable mapping an NCHW float batch to the module's output as a float32 array.

    Args:
        module: the frozen module to run.
        input_size: one image's (C, H, W).
        batch_size: the batch size the runner will mostly see (the session is warmed at it).
        engine: ``auto``, ``torch`` or ``onnxruntime``.
        onnx_path: onnxruntime only: where the exported module is cached. An existing file is
            loaded as it is (its name must identify the module, see graft.feature_cache); a
            missing one is written. None exports to a temporary file for this run.
        threads: onnxruntime only: intra-op threads (None: one per physical core).
        run_memory_mb: onnxruntime only: the budget for one run's activations (see
            :class:`OnnxRunner`).
    """
    if resolve_engine(engine) == "torch":
        return TorchRunner(module)
    return OnnxRunner(
        module,
        tuple(input_size),
        batch_size,
        onnx_path=onnx_path,
        threads=threads,
        run_memory_mb=run_memory_mb,
    )


class TorchRunner:
    """Eager torch in inference mode, channels-last (1.7x faster than NCHW on CPU, measured)."""

    def __init__(self, module: nn.Module) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module = module.eval().to(self.device, memory_format=torch.channels_last)

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        # cuDNN would run fp32 convolutions in TF32 (about 1e-2 off on tf_efficientnet_lite0,
        # measured on an H100); fp32 features must agree with onnxruntime's within 1e-4.
        cudnn = torch.backends.cudnn
        strict_fp32 = cudnn.flags(
            enabled=cudnn.enabled,
            benchmark=cudnn.benchmark,
            deterministic=cudnn.deterministic,
            allow_tf32=False,
        )
        with torch.inference_mode(), strict_fp32:
            batch = batch.to(self.device, memory_format=torch.channels_last)
            return self.module(batch).float().cpu().numpy()


class OnnxRunner:
    """The module as ONNX, run by a warmed onnxruntime CPU session.

    Args:
        module: the module to export; may be None when ``onnx_path`` already exists.
        input_size: one image's (C, H, W).
        batch_size: the session is warmed at this batch size.
        onnx_path: a cached export to load, or to write when missing; None: a temporary export.
        threads: intra-op threads (None: onnxruntime's default, one per physical core).
        run_memory_mb: a batch whose activations would take more than this (see
            :func:`rows_for_budget`) runs in slices (the same outputs; onnxruntime's arena, and so
            the resident memory, stays that of one slice). ``rows`` is the images a run takes.
    """

    def __init__(
        self,
        module: nn.Module | None,
        input_size: tuple[int, ...],
        batch_size: int,
        *,
        onnx_path: Path | None = None,
        threads: int | None = None,
        run_memory_mb: float = RUN_MEMORY_MB,
    ) -> None:
        if onnx_path is not None:
            if not onnx_path.is_file():
                if module is None:
                    raise FileNotFoundError(onnx_path)
                export_engine(module, input_size, onnx_path)
            self.session = inference_session(onnx_path, threads=threads)
            self.rows = rows_for_budget(onnx_path, input_size, run_memory_mb)
        else:
            if module is None:
                raise ValueError("OnnxRunner needs a module or an existing onnx_path")
            with tempfile.TemporaryDirectory(prefix="graft-engine-") as folder:
                path = export_engine(module, input_size, Path(folder) / "module.onnx")
                self.session = inference_session(path, threads=threads)
                self.rows = rows_for_budget(path, input_size, run_memory_mb)
        self.input_name = self.session.get_inputs()[0].name
        warm = np.zeros((slice_rows(batch_size, self.rows), *input_size), np.float32)
        self.session.run(None, {self.input_name: warm})

    def __call__(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(batch, torch.Tensor):
            batch = batch.numpy()
        return run_single(self.session, batch, rows=self.rows)


def activation_bytes_per_image(model: Path | str | bytes, input_size: tuple[int, ...]) -> int:
    """The most bytes of intermediate tensors alive at once while the model runs one image.

    The model runs once on a zero image with every node's output exposed (their sizes, whatever
    the graph computes its shapes with), then its nodes are walked in order, each output alive from
    the node that writes it to the last node that reads it: the peak is what onnxruntime's arena
    holds per image (9.7 MB computed for tf_efficientnet_lite0 at 224 px; its arena grew by
    10.2 MB an image from 16 to 64 images a run, measured).
    """
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    graph = proto.graph
    first = graph.input[0].name
    exposed = {output.name for output in graph.output}
    for node in graph.node:
        for name in node.output:
            if name and name not in exposed and node.op_type != "Constant":
                graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                exposed.add(name)
    session = inference_session(proto.SerializeToString(), threads=1, quiet=True)
    names = [output.name for output in session.get_outputs()]
    values = session.run(None, {first: np.zeros((1, *input_size), np.float32)})
    size = {name: value.nbytes for name, value in zip(names, values, strict=True)}
    size[first] = 4 * int(np.prod(input_size))
    last_read = {name: i for i, node in enumerate(graph.node) for name in node.input}
    live = peak = size[first]
    for i, node in enumerate(graph.node):
        live += sum(size.get(name, 0) for name in node.output)
        peak = max(peak, live)
        live -= sum(size.get(name, 0) for name in set(node.input) if last_read.get(name) == i)
    return peak


def rows_for_budget(
    model: Path | str | bytes, input_size: tuple[int, ...], budget_mb: float = RUN_MEMORY_MB
) -> int:
    """Images one run takes so that their activations stay within ``budget_mb`` (at least one)."""
    per_image = activation_bytes_per_image(model, input_size)
    return max(1, int(budget_mb * 2**20) // max(per_image, 1))


def export_engine(module: nn.Module, input_size: tuple[int, ...], path: Path) -> Path:
    """The frozen module as an engine file (no metadata: its cache folder names it)."""
    return export_onnx(module, input_size, path, input_name=_INPUT, output_name=_OUTPUT)
