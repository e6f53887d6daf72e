# syntax=docker/dockerfile:1
# CXR-FHIR server image: multi-stage, CPU-only torch, non-root, weights and the ONNX export inside.
#
#   docker build -t cxr-fhir .
#   docker run -p 8000:8000 cxr-fhir                      # embedded defaults (SQLite in /var/lib/cxr)
#   docker run ... cxr-fhir cxr worker | cxr db upgrade   # the other roles of the same image
#
# TORCH_INDEX: torch's CPU-only wheels (about 1.5 GB smaller than the CUDA build PyPI serves); a
# site that mirrors packages points it at its mirror. `torch==2.14.1` in pyproject.toml accepts the
# CPU build (2.14.1+cpu), so the package install below does not pull the CUDA build back in.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# ---- build: a virtual environment with the server and its weights ---------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ml ml
COPY fhir_server fhir_server
COPY mappings mappings
RUN pip install . && pip check
# Export the bundled model and the OOD gate to ONNX now, so a replica serves at once instead of
# exporting on its first start (the cache key is the weights' digest: it stays valid in this image).
ENV CXR_ENGINE_CACHE_DIR=/opt/cxr/onnx-cache
RUN python -c "from fhir_server.app import load_analyzer; from fhir_server.settings import Settings; \
load_analyzer(Settings(data_dir='/tmp/warm')).close()" \
    && ls -la /opt/cxr/onnx-cache

# ---- runtime ----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="CXR-FHIR" \
      org.opencontainers.image.description="FHIR R4 server and DICOM node for AI analysis of chest radiographs (decision support, not a diagnosis)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    CXR_HOST=0.0.0.0 CXR_PORT=8000 CXR_DATA_DIR=/var/lib/cxr CXR_WEIGHTS_DIR=/var/lib/cxr/weights \
    CXR_ENGINE_CACHE_DIR=/opt/cxr/onnx-cache OMP_WAIT_POLICY=PASSIVE
RUN useradd --system --uid 10001 --home-dir /var/lib/cxr --shell /usr/sbin/nologin cxr \
    && mkdir -p /var/lib/cxr/weights && chown -R cxr:cxr /var/lib/cxr
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/cxr /opt/cxr
USER 10001
WORKDIR /var/lib/cxr
VOLUME ["/var/lib/cxr"]
# 8000: HTTP (FHIR, legacy API, reading page, /metrics); 11112: DICOM when CXR_DICOM_PORT=11112
EXPOSE 8000 11112
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CXR_PORT','8000'), timeout=2)" || exit 1
CMD ["cxr", "serve"]
