"""Serving the exported ONNX model: ``graft serve`` (HTTP) and ``graft predict`` (files).

Needs only the ``serve`` extra (onnxruntime, FastAPI, uvicorn, python-multipart,
prometheus-client) besides
graft's base dependencies: nothing here imports torch, timm, onnx, scikit-learn or pandas.

- :mod:`graft.serving.model`: load a model file with its labels and preprocessing, classify.
- :mod:`graft.serving.predict`: classify files and folders into a CSV or JSON table.
- :mod:`graft.serving.app`: the FastAPI application (endpoints, reload, error answers).
- :mod:`graft.serving.contract`: the OpenAPI contract of graft's own API (schemas, bodies).
- :mod:`graft.serving.inputs`: request bodies within limits (size, time, uploads at once).
- :mod:`graft.serving.v2`: the Open Inference Protocol (KServe v2) endpoints.
- :mod:`graft.serving.observability`: Prometheus metrics, request ids, text or JSON logs.
- :mod:`graft.serving.server`: uvicorn with a header timeout and a connection cap; workers.
- :mod:`graft.serving.limits`: the limits' values (light: the CLI reads their defaults).
"""
