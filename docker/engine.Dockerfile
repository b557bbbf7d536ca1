# The reference engine with its stats endpoint. CPU torch by default; the GPU override passes a
# CUDA wheel index as TORCH_INDEX_URL.
# BASE_IMAGE: tests/images builds on a stand-in with the same Python where Docker Hub is out of reach.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0
WORKDIR /opt/kvcache-exporter
COPY pyproject.toml README.md ./
COPY exporter ./exporter
COPY kvstats ./kvstats
COPY engine_shim ./engine_shim
RUN pip install --no-cache-dir ".[engine]" \
    && useradd --system --no-create-home kvcache \
    && mkdir -p /data/kv && chown kvcache /data/kv
USER kvcache
EXPOSE 8321
CMD ["kvcache-shim", "reference", "--listen", "0.0.0.0:8321", "--workload", "agentic"]
