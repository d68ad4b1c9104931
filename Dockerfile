# NANN Retrieve service images. Targets:
#   runtime  (default) python -m server: the server's pinned runtime set only, non-root,
#            HEALTHCHECK through grpc.health.v1, model mounted at /models
#   loadtest locust with the gRPC user (loadtest/locustfile.py)
#   trainer  the offline pipeline (synthesize, train, index, export, features), used by the
#            docker-compose `init` service to build the demo model into a volume
#
#   docker build -t nann-retrieval .                      (or: make image, which also makes a base)
#   docker run -v W:/models:ro -p 50051:50051 -p 9100:9100 nann-retrieval
#
# W is a workdir holding export/ (versioned SavedModels) and features/ (the snapshot); the
# server reads /models/export and the embedded store /models/features unless NANN_MODEL /
# NANN_FEATURES say otherwise. To bake a model in instead of mounting one, build on top:
#   FROM nann-retrieval
#   COPY export /models/export
#   COPY features /models/features
#
# BASE_IMAGE must have python3 (3.11) with venv. Where images cannot be pulled, make one with
# debootstrap (scripts/image.sh does). If pip needs a private CA bundle, put it at
# .docker-build/pip-ca.crt (scripts/image.sh copies the machine's); it is used by the
# dependency stages only and never reaches the runtime image.
ARG BASE_IMAGE=python:3.11-slim

# --- dependency stages: one virtualenv per pinned set --------------------------------------------
FROM ${BASE_IMAGE} AS deps-server
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=180
RUN python3 -m venv /opt/venv
# The glob makes the CA bundle optional.
COPY requirements-server.txt .docker-build/pip-ca.cr[t] /tmp/build/
RUN if [ -f /tmp/build/pip-ca.crt ]; then export PIP_CERT=/tmp/build/pip-ca.crt; fi \
    && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install -r /tmp/build/requirements-server.txt

FROM deps-server AS deps-loadtest
COPY requirements-loadtest.txt /tmp/build/
RUN if [ -f /tmp/build/pip-ca.crt ]; then export PIP_CERT=/tmp/build/pip-ca.crt; fi \
    && /opt/venv/bin/pip install -r /tmp/build/requirements-loadtest.txt

FROM deps-loadtest AS deps-full
# hnswlib builds from source: a compiler and the Python headers, in this stage only.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ python3-dev \
    && rm -rf /var/lib/apt/lists/*
COPY requirements.txt /tmp/build/
RUN if [ -f /tmp/build/pip-ca.crt ]; then export PIP_CERT=/tmp/build/pip-ca.crt; fi \
    && /opt/venv/bin/pip install -r /tmp/build/requirements.txt

# --- common to the final images: a non-root user, the venv on PATH -------------------------------
FROM ${BASE_IMAGE} AS base
RUN groupadd --system --gid 10001 nann \
    && useradd --system --uid 10001 --gid nann --home-dir /home/nann --create-home nann \
    && mkdir -p /models && chown nann:nann /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /app

# --- trainer: the offline pipeline, for docker-compose's init service ----------------------------
FROM base AS trainer
COPY --from=deps-full /opt/venv /opt/venv
COPY nann/ nann/
COPY nann_common/ nann_common/
COPY model_export/ model_export/
COPY walk/ walk/
COPY index_builder/ index_builder/
COPY server/ server/
COPY scripts/demo.py scripts/demo.py
USER nann
CMD ["python", "scripts/demo.py", "--root", "/models/demo", "--build-only"]

# --- loadtest: locust with the gRPC user ---------------------------------------------------------
FROM base AS loadtest
COPY --from=deps-loadtest /opt/venv /opt/venv
COPY nann/ nann/
COPY nann_common/ nann_common/
COPY server/ server/
COPY loadtest/ loadtest/
ENV PYTHONPATH=/app
USER nann
EXPOSE 8089
ENTRYPOINT ["locust", "-f", "/app/loadtest/locustfile.py"]

# --- runtime (default target): python -m server ---------------------------------------------------
FROM base AS runtime
COPY --from=deps-server /opt/venv /opt/venv
COPY nann/ nann/
COPY nann_common/ nann_common/
COPY server/ server/
ENV PYTHONPATH=/app \
    NANN_HOST=0.0.0.0 \
    NANN_PORT=50051 \
    NANN_METRICS_PORT=9100 \
    NANN_MODEL=/models/export
USER nann
VOLUME ["/models"]
EXPOSE 50051 9100
# Loading, verifying and warming a large model takes a while: health is NOT_SERVING until done.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "server.healthcheck"]
ENTRYPOINT ["python", "-m", "server"]
