# The training image, set up exactly as `make run` and CI set up a fresh clone (`make env`).
#   docker build -t graft .
#   docker run --rm graft                                  # the embedded sample, end to end
#   docker run --rm -v "$PWD/data:/project/data" graft     # your own images
# (A slim serving image, without torch, comes with `graft serve`.)
FROM python:3.11-slim

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
