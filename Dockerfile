# syntax=docker/dockerfile:1
# The gateway image: `docker build -t mlflow-tenant-gateway .`
#
# Stage 1 installs the package and its dependencies into a virtualenv; stage 2 copies only that
# virtualenv onto a fresh slim base. No compiler, pip or source tree reaches the final image (every
# dependency ships a manylinux wheel for CPython 3.11). The container is configured only through
# GATEWAY_* and AWS_* environment variables (see README.md "Configuration").

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
# Only what the package build reads (pyproject's `readme` is README.md).
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install --only-binary=:all: --no-binary=mlflow-tenant-gateway . \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib \
    && /opt/venv/bin/pip uninstall --yes pip setuptools wheel

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="mlflow-tenant-gateway" \
      org.opencontainers.image.description="Multi-tenant gateway in front of an unmodified MLflow tracking server" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gateway
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
# /health answers 200 while the process serves (it does not call MLflow; /ready does). curl is not
# in the slim image, so the check uses the standard library; urlopen raises on any non-2xx status.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GATEWAY_PORT', '8080') + '/health', timeout=4)"]
# Exec form: the gateway is PID 1 and receives SIGTERM directly (uvicorn drains and exits).
ENTRYPOINT ["mlflow-gateway", "serve"]
