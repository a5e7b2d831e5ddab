"""Preprocessing inside the graph: a variant of an exported model that takes uint8 images.

Clients outside Python cannot run timm's transform. This variant asks them only to resize and
crop: its input is ``uint8`` RGB ``[batch, height, width, 3]`` (NHWC) at the model's input
size, and the graph itself scales to [0, 1], subtracts the mean, divides by the std and
transposes to NCHW, with the same float operations in the same order as the training pipeline
(``ToTensor`` then ``Normalize``), so its outputs equal the float model's on the same pixels.
It is a function of the ONNX graph alone, so it composes with whatever the graph already holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graft.errors import GraftError


class PortableGraphError(GraftError):
    """A model cannot take its preprocessing inside the graph."""


def uint8_nhwc_variant(
    model: onnx.ModelProto, mean: Sequence[float], std: Sequence[float]
) -> onnx.ModelProto:
    """A copy of ``model`` whose one float NCHW image input becomes uint8 NHWC pixels.

    Args:
        model: a model with exactly one graph input, float ``[batch, 3, height, width]``.
        mean, std: the per-channel normalisation of pixels scaled to [0, 1] (timm's data config).

    Raises:
        PortableGraphError: if the model's input is not one 4-d float image tensor.
    """
    variant = onnx.ModelProto()
    variant.CopyFrom(model)
    graph = variant.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    image = inputs[0] if len(inputs) == 1 else None
    tensor_type = image.type.tensor_type if image is not None else None
    if tensor_type is None or tensor_type.elem_type != TensorProto.FLOAT:
        raise PortableGraphError("the model must have exactly one float32 image input")
    if len(tensor_type.shape.dim) != 4 or len(mean) != len(std):
        raise PortableGraphError("the model's input must be [batch, channels, height, width]")
    batch, channels, height, width = tensor_type.shape.dim
    name = image.name
    prefix = f"{name}_preprocess"
    normalised = f"{prefix}_normalised"
    for node in graph.node:
        node.input[:] = [normalised if value == name else value for value in node.input]
    constants = {
        f"{prefix}_255": np.float32(255.0),
        f"{prefix}_mean": np.asarray(mean, np.float32).reshape(1, -1, 1, 1),
        f"{prefix}_std": np.asarray(std, np.float32).reshape(1, -1, 1, 1),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    steps = [
        helper.make_node("Cast", [name], [f"{prefix}_float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", [f"{prefix}_float"], [f"{prefix}_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Div", [f"{prefix}_nchw", f"{prefix}_255"], [f"{prefix}_scaled"]),
        helper.make_node("Sub", [f"{prefix}_scaled", f"{prefix}_mean"], [f"{prefix}_centred"]),
        helper.make_node("Div", [f"{prefix}_centred", f"{prefix}_std"], [normalised]),
    ]
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*steps, *nodes])
    pixels = helper.make_tensor_value_info(name, TensorProto.UINT8, None)
    pixels.type.tensor_type.shape.dim.extend([batch, height, width, channels])
    position = list(graph.input).index(image)
    graph.input.remove(image)
    graph.input.insert(position, pixels)
    onnx.checker.check_model(variant, full_check=True)
    return variant
