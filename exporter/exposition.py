"""The exposition, rendered at most once per change and served from memory.

Polls mark it stale; a scrape renders it only if something changed since the last render
(concurrent scrapes coalesce on one render), so a scrape costs at most one
``generate_latest`` and usually a memory copy. Process metrics are rendered fresh each time.
"""

from __future__ import annotations

import gzip
import threading

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector


class CachedExposition:
    def __init__(self, collector: Collector, process_metrics: bool = True) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(collector)
        self._process = CollectorRegistry(auto_describe=False)
        if process_metrics:
            ProcessCollector(registry=self._process)
        self._lock = threading.Lock()
        self._generation = 0
        self._rendered_generation = -1
        self._body = b""
        self._gzipped: bytes | None = None
        self.renders = 0

    def invalidate(self) -> None:
        """Called after every poll; cheap, from any thread."""
        self._generation += 1

    def _current(self) -> tuple[bytes, int]:
        with self._lock:
            if self._rendered_generation != self._generation:
                generation = self._generation
                self._body = generate_latest(self._registry)
                self._gzipped = None
                self._rendered_generation = generation
                self.renders += 1
            return self._body, self._rendered_generation

    def render(self) -> bytes:
        body, _ = self._current()
        return body + generate_latest(self._process)

    def render_gzip(self) -> bytes:
        """Gzip of the cached part is cached too; process metrics are appended as a gzip member."""
        body, generation = self._current()
        with self._lock:
            if self._gzipped is None or generation != self._rendered_generation:
                self._gzipped = gzip.compress(body, compresslevel=1)
            cached = self._gzipped
        # Concatenated gzip members decompress as one stream (RFC 1952).
        return cached + gzip.compress(generate_latest(self._process), compresslevel=1)
