# The sidecar: slim, no torch (the exporter never imports it), non-root.
# BASE_IMAGE: tests/images builds on a stand-in with the same Python where Docker Hub is out of reach.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
WORKDIR /opt/kvcache-exporter
COPY pyproject.toml README.md ./
COPY exporter ./exporter
COPY kvstats ./kvstats
COPY engine_shim ./engine_shim
RUN pip install --no-cache-dir . \
    && useradd --system --no-create-home kvcache \
    && python -c "import exporter.app, sys; assert 'torch' not in sys.modules"
USER kvcache
EXPOSE 8322
CMD ["kvcache-exporter", "--config", "/etc/kvcache/exporter.yaml"]
