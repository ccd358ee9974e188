# The image deploy/k8s runs (open-autoglm:0.1.0): billing, inference, the router and the Python sidecar, with
# the bundled model built into it at image build time. From the repository root:
#   docker build -t open-autoglm:0.1.0 .
# Stage 1 builds the INT8 ONNX model with the one-off toolchain (PyTorch CPU, transformers); stage 2 installs
# only what the services run on and copies the built model, so the image carries no build toolchain.
# Checked by hadolint in the test suite (tests/e2e/test_deploy_manifests.py).

# --- stage 1: the model --------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS model
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AUTOGLM_MODEL_CACHE=/opt/autoglm/models
WORKDIR /src
# The CPU build of PyTorch (the default index's wheel pulls the CUDA runtime, several GB).
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY gen gen
COPY services services
COPY sidecar sidecar
# The project itself: its dependencies are pinned by pyproject.toml's ranges.
# hadolint ignore=DL3013
RUN /opt/build/bin/pip install ".[cpu,model-build]" \
    && /opt/build/bin/python -m services.inference.modelbuild \
    && /opt/build/bin/python -m services.inference.modelbuild --precision int4

# --- stage 2: the services -----------------------------------------------------------------------------
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    AUTOGLM_MODEL_CACHE=/opt/autoglm/models \
    PATH=/opt/autoglm/venv/bin:$PATH
WORKDIR /opt/autoglm/app
RUN python -m venv /opt/autoglm/venv
COPY pyproject.toml README.md ./
COPY gen gen
COPY services services
COPY sidecar sidecar
COPY deploy/policy deploy/policy
COPY deploy/local deploy/local
# hadolint ignore=DL3013
RUN pip install ".[cpu,postgres,redis]"
COPY --from=model /opt/autoglm/models /opt/autoglm/models
# One unprivileged user (the group the k8s manifests' fsGroup gives the data volume); nothing runs as root.
RUN groupadd --system --gid 10001 autoglm \
    && useradd --system --uid 10001 --gid autoglm --home-dir /var/lib/autoglm --create-home autoglm
USER 10001:10001
# router gRPC + OpenAI HTTP, billing, inference; each service's metrics port is set by its flags.
EXPOSE 50051 8080 50061 50071
ENTRYPOINT ["python", "-m"]
CMD ["services.router"]
