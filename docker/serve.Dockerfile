# syntax=docker/dockerfile:1.7
# The serving image: `nmt serve` on ONNX Runtime with CUDA, and the clients (translate, batch, health).
# No torch: the base install only. Works on CPU too (`--device cpu`), the CUDA libraries are then unused.
#
#   docker build -f docker/serve.Dockerfile -t nmt-serve:0.1.0 .
#
# onnxruntime-gpu 1.31.1 is built against CUDA 13.0 and cuDNN 9. Its `cuda` and `cudnn` extras bring
# NVIDIA's own pip wheels of those libraries, so the image needs no CUDA base image and the library
# versions are pinned below like every other package. The host needs an NVIDIA driver that runs
# CUDA 13 (R580 or newer) and the NVIDIA Container Toolkit, which mounts libcuda.so at run time.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------- build: a venv with the base install
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The full resolved dependency closure of the serving install, pinned (tested versions).
COPY <<EOF /tmp/requirements-serve.txt
numpy==2.4.6
onnx==1.23.2
ml_dtypes==0.7.0
onnxruntime-gpu[cuda,cudnn]==1.31.1
sentencepiece==0.2.3
grpcio==1.85.3
grpcio-health-checking==1.85.1
grpcio-reflection==1.85.1
protobuf==7.36.2
prometheus-client==0.26.0
sacrebleu==2.6.0
tqdm==4.70.1
flatbuffers==25.12.19
packaging==26.4
nvidia-cuda-runtime==13.5.37
nvidia-cuda-nvrtc==13.5.37
nvidia-cublas==13.10.0.20
nvidia-cufft==12.5.0.14
nvidia-curand==10.4.5.25
nvidia-nvjitlink==13.5.37
nvidia-cudnn-cu13==9.28.1.4
portalocker==4.4.2
regex==2026.11.19
tabulate==0.10.0
colorama==0.4.6
lxml==6.1.3
typing-extensions==4.16.0
starlette==1.10.0
uvicorn==0.55.0
h11==0.16.0
click==8.5.1
anyio==4.16.0
idna==3.20
sniffio==1.3.1
python-multipart==0.0.34
py3langid==0.4.0
pysbd==0.3.4
EOF
RUN pip install -r /tmp/requirements-serve.txt

# Only what serving needs: the torch-free core (nmt/) and serve/. Training, export, the benchmarks and the
# stress harness (bench/), tests, scripts and docs stay out of the image.
# A C compiler for the slot decoder's kernels (serve/engine/csrc, built by the install below);
# only the built library goes on to the runtime stage.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY nmt ./nmt
COPY serve ./serve
# --no-deps: everything is pinned above, so the project cannot pull in an unpinned (or torch) package.
RUN pip install --no-deps . && pip check && ! pip show torch >/dev/null 2>&1 \
    && cd / && python -c "from serve.engine.native import library_path; assert library_path(), 'serve/engine/csrc not built'"

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/venv /opt/venv
# The CUDA/cuDNN libraries live inside the venv's nvidia/*/lib folders: register them with the
# dynamic loader so ONNX Runtime's CUDA provider finds them without LD_LIBRARY_PATH tricks.
RUN find /opt/venv/lib -path '*/site-packages/nvidia/*/lib' -type d > /etc/ld.so.conf.d/nvidia-wheels.conf \
    && ldconfig

# Non-root. /bundles exists and belongs to the user so a fresh named volume mounted there inherits it.
RUN groupadd --system --gid 10001 nmt \
    && useradd --system --uid 10001 --gid nmt --home-dir /home/nmt --create-home nmt \
    && mkdir -p /bundles && chown nmt:nmt /bundles
USER nmt
WORKDIR /home/nmt

# gRPC, Prometheus metrics and the HTTP API.
EXPOSE 50051 9090 5000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["nmt", "health", "--server", "localhost:50051"]
CMD ["nmt", "serve", "--model-dir", "/bundles/en-de", "--host", "0.0.0.0", "--port", "50051", \
     "--metrics-port", "9090", "--device", "auto", "--drain-seconds", "20"]
