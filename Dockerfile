# Two images from one file:
#   docker build --target serve -t graft-serve .           # slim serving image: no torch
#   docker run --rm -p 8000:8000 -v "$PWD/models/production:/models:ro" graft-serve
#   docker build -t graft .                                 # the training image (stage `train`)
#   docker run --rm graft                                  # the embedded sample, end to end
#   docker run --rm -v "$PWD/data:/project/data" graft     # your own images

# ---- serve: Python, onnxruntime, FastAPI, uvicorn, Pillow, NumPy, prometheus-client; no torch.
# The dependencies come from the pinned lock (requirements/serve.lock, the `serve` extra resolved
# by pip-compile) in a layer of their own, so editing the source does not reinstall them; then
# graft itself without dependencies. `make test-serve` runs the server tests with the same
# extra alone, so they prove this image needs nothing more.
FROM python:3.11-slim AS serve

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN useradd --system --uid 10001 graft
COPY requirements/serve.lock requirements/serve.lock
RUN python -m pip install --requirement requirements/serve.lock
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m pip install --no-deps .

USER graft
EXPOSE 8000
# Mount the model folder at /models; replacing model.onnx there (by rename) reloads it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["graft", "serve", "/models/model.onnx", "--host", "0.0.0.0"]

# ---- train: set up exactly as `make run` and CI set up a fresh clone (`make env`). The last
# stage, so a plain `docker build .` builds it.
FROM python:3.11-slim AS train

RUN apt-get update \
    && apt-get install --yes --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/*

ENV PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    GX_ANALYTICS_ENABLED=False \
    PYTHONUNBUFFERED=1

WORKDIR /project
COPY . .
RUN git init --quiet && make env
CMD ["make", "run"]
