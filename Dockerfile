# Mirrors the README install: torch pinned first, then the package; serves on the embedded defaults.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    CXR_HOST=0.0.0.0 CXR_PORT=8000 CXR_DATA_DIR=/var/lib/cxr CXR_WEIGHTS_DIR=/var/lib/cxr/weights

WORKDIR /app
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY ml ml
COPY fhir_server fhir_server
COPY mappings mappings
RUN pip install --no-cache-dir . \
    && useradd --system --home /var/lib/cxr cxr && mkdir -p /var/lib/cxr/weights && chown -R cxr /var/lib/cxr

USER cxr
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["cxr", "serve"]
