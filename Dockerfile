# syntax=docker/dockerfile:1
# hposvc images. Two targets:
#   hposvc (default): the CLI with torch, for `hposvc worker` / `hposvc study run`
#       docker build -t hposvc:cpu .                              # CPU-only torch (small)
#       docker build -t hposvc:cuda --build-arg TORCH_VARIANT=cuda .   # torch with CUDA
#   mlflow: an MLflow tracking server that can use PostgreSQL (mlflow + psycopg, no torch)
#       docker build -t hposvc-mlflow --target mlflow .
# docker-compose.yml builds both; the README shows the whole set-up.

ARG PYTHON_VERSION=3.11
# The same MLflow on both sides, so client and server agree on the REST API.
ARG MLFLOW_VERSION=3.17.2

# --- MLflow tracking server ---------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS mlflow
ARG MLFLOW_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg[binary]>=3.1" \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir -p /mlartifacts && chown mlflow: /mlartifacts
USER mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]

# --- hposvc ------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS hposvc
ARG MLFLOW_VERSION
# cpu: torch from PyTorch's CPU wheel index (about 200 MB); cuda: PyPI's torch for Linux,
# which bundles the CUDA libraries (several GB) and needs the NVIDIA container toolkit.
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    HPOSVC_DATA_DIR=/data

# torch first, in its own layer: it is the big one and changes least often.
RUN case "$TORCH_VARIANT" in \
        cpu)  pip install --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION" ;; \
        cuda) pip install "torch==$TORCH_VERSION" ;; \
        *)    echo "TORCH_VARIANT must be 'cpu' or 'cuda', got '$TORCH_VARIANT'" >&2; exit 2 ;; \
    esac

WORKDIR /app
COPY pyproject.toml README.md ./
COPY hposvc ./hposvc
COPY studies ./studies
# The installed torch satisfies the project's torch range, so pip keeps it.
RUN pip install ".[postgres,grpc]" "mlflow==${MLFLOW_VERSION}" \
    && useradd --create-home --uid 1000 hposvc \
    && mkdir -p /data && chown hposvc: /data
USER hposvc
# Local fallbacks live here (e.g. tracking data kept while the MLflow server is down).
VOLUME ["/data"]
ENTRYPOINT ["hposvc"]
CMD ["--help"]
