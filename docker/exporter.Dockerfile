# The sidecar: slim, no torch (the exporter never imports it), non-root.
FROM python:3.11-slim
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
