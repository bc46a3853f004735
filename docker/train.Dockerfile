# syntax=docker/dockerfile:1.7
# The training and export image: a CUDA build of torch 2.13.0 plus the `train` extra
# (onnx, onnxscript, matplotlib) on top of the serving install. Runs `nmt train`, `nmt evaluate`,
# `nmt export` and everything else `nmt` offers.
#
#   docker build -f docker/train.Dockerfile -t nmt-train:0.1.0 .
#
# torch's CUDA wheels carry their own CUDA runtime; the host needs only the NVIDIA driver and the
# NVIDIA Container Toolkit. TORCH_INDEX_URL picks the CUDA flavour (cu130 matches the CUDA 13 that
# the serving image's onnxruntime-gpu uses; https://download.pytorch.org/whl/cu128 suits older drivers).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from its CUDA index, so the project's `torch==2.13.0` requirement is already met.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Pinned (tested) versions of the project's direct dependencies.
COPY <<EOF /tmp/constraints-train.txt
torch==2.13.0
onnx==1.23.2
onnxscript==0.7.2
matplotlib==3.11.2
numpy==2.4.6
onnxruntime-gpu==1.31.1
sentencepiece==0.2.3
grpcio==1.85.3
grpcio-health-checking==1.85.1
grpcio-reflection==1.85.1
protobuf==7.36.2
prometheus-client==0.26.0
sacrebleu==2.6.0
tqdm==4.70.1
EOF

WORKDIR /src
COPY pyproject.toml README.md ./
COPY nmt ./nmt
COPY train ./train
COPY export ./export
COPY serve ./serve
RUN pip install -c /tmp/constraints-train.txt ".[train]" && pip check \
    && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__"

# Non-root. The job folders exist and belong to the user so fresh named volumes inherit the owner.
RUN groupadd --system --gid 10001 nmt \
    && useradd --system --uid 10001 --gid nmt --home-dir /home/nmt --create-home nmt \
    && mkdir -p /data /runs /bundles && chown nmt:nmt /data /runs /bundles
USER nmt
WORKDIR /home/nmt
# Multi30k downloads land in $XDG_CACHE_HOME/nmt/multi30k: inside the data volume, kept across runs.
ENV XDG_CACHE_HOME=/data

# A job image has no server to ask; the check says the toolchain itself is usable.
HEALTHCHECK --interval=30s --timeout=10s --retries=3 CMD ["nmt", "--version"]
CMD ["nmt", "--help"]
