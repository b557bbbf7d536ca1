"""The kvcache-exporter sidecar: polls engine shims and NVML, publishes Prometheus metrics.

It never imports torch (a test holds it to that): the exporter must stay a small process.
"""

__version__ = "0.1.0"
