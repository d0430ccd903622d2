# syntax=docker/dockerfile:1
# submerge: the API (`submerge serve`) and, with another command, the Celery worker (`submerge worker`).
#
# CPU image (default):   docker build -t submerge .
# GPU image (CUDA torch): docker build -t submerge:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
# A base image without Python (the nvidia/cuda ones) gets the distribution's python3 (>= 3.10).
ARG BASE_IMAGE=python:3.11-slim

# ---- builder: everything installed into /opt/venv ---------------------------------------------
FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU (or the TORCH_INDEX) wheel index, so pip does not pull a multi-GB CUDA build
RUN pip install --index-url "$TORCH_INDEX" "torch>=2.3"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY merging ./merging
COPY evaluation ./evaluation
COPY workers ./workers
COPY service ./service
# psycopg: PostgreSQL driver for SUBMERGE_DATABASE_URL=postgresql://...
RUN pip install . "psycopg[binary]>=3.1"

# ---- runtime: the venv, a non-root user, nothing else --------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    SUBMERGE_DATA_DIR=/data
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --create-home --uid 10001 --user-group submerge \
 && mkdir -p /data && chown submerge:submerge /data
COPY --from=builder /opt/venv /opt/venv
USER submerge
WORKDIR /home/submerge
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)" || exit 1
# Not on loopback: authentication is required unless SUBMERGE_API_KEYS is set (or SUBMERGE_AUTH=off).
CMD ["submerge", "serve", "--host", "0.0.0.0", "--port", "8000"]
