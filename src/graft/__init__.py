"""graft: graft a new head onto a pretrained trunk, and ship it as ONNX."""

__version__ = "0.1.0"
