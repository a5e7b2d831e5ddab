"""Serving the exported ONNX model: ``graft serve`` (HTTP) and ``graft predict`` (files).

Needs only the ``serve`` extra (onnxruntime, FastAPI, uvicorn, python-multipart) besides
graft's base dependencies: nothing here imports torch, timm, onnx, scikit-learn or pandas.

- :mod:`graft.serving.model`: load a model file with its labels and preprocessing, classify.
- :mod:`graft.serving.predict`: classify files and folders into a CSV or JSON table.
- :mod:`graft.serving.app`: the FastAPI application (endpoints, limits, hot reload).
"""
