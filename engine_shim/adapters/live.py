"""What any in-process adapter needs around its tracker: a snapshot consistent with the
engine's scheduler thread (``LiveView``) and a stats endpoint that never stops the engine
(``ShimEndpoint``). The vLLM adapter uses both; the next in-process adapter (SGLang's
scheduler) would too."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from kvstats.snapshot import Snapshot

BIND_RETRY_SECONDS = 10.0


class SnapshotSource(Protocol):
    """An adapter's tracker: its O(1) snapshot from the counts it keeps."""

    def snapshot(self, running: int, waiting: int, at: float | None = None) -> Snapshot: ...


T = TypeVar("T", bound=SnapshotSource)


class LiveView(Generic[T]):
    """The snapshot a stats reader gets, consistent with the scheduler thread.

    When no model step is in flight the engine is idle (or between steps): its state is current
    now, so the snapshot is built fresh with ``time`` = now and a quiet engine never looks
    stale. While a step is in flight the pool stays as the last scheduler call left it, and
    ``time`` is that call's end: an engine stuck in a step ages, and only a hung engine trips
    ``KVCacheStaleData``. Building is O(1) (the tracker's counts).
    """

    def __init__(self, tracker: T, counts: Callable[[], tuple[int, int]]) -> None:
        self.tracker = tracker
        self._counts = counts
        self.lock = threading.Lock()
        self.steps_in_flight = 0
        self.state_time = time.time()

    def touched(self) -> None:
        """Called under ``lock`` at the end of every mutator."""
        self.state_time = time.time()

    def snapshot(self) -> Snapshot:
        with self.lock:
            running, waiting = self._counts()
            at = None if self.steps_in_flight == 0 else self.state_time
            return self.tracker.snapshot(running, waiting, at=at)


class ShimEndpoint:
    """The stats server of one engine core; a busy port must never stop the engine serving.

    On a port that is taken, the engine starts anyway: one ERROR line says which address and
    how to fix it, the exporter's target for this engine reads down (connection refused,
    counted), and binding is retried every ``BIND_RETRY_SECONDS`` until it succeeds.
    """

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        dp_rank: int,
        engine: str,
        log: logging.Logger,
    ) -> None:
        self.app, self.host, self.port, self.dp_rank = app, host, port, dp_rank
        self.engine, self.log = engine, log
        self.server: Any = None
        self._stop = threading.Event()
        self._retry: threading.Thread | None = None

    def start(self) -> bool:
        if self._try_bind(first=True):
            return True
        self._retry = threading.Thread(
            target=self._keep_trying, name="kvcache-shim-bind", daemon=True
        )
        self._retry.start()
        return False

    def _try_bind(self, first: bool) -> bool:
        from ..server import ShimServer

        try:
            server = ShimServer(self.app, self.host, self.port)
        except OSError as exc:
            if first:
                self.log.error(
                    "kvcache shim: cannot serve KV stats for DP rank %d on %s:%d (%s). %s keeps"
                    " serving; the exporter will show this engine as down. Give every %s"
                    " server on this host its own KVCACHE_SHIM_LISTEN port (each DP rank adds 1)."
                    " Retrying every %.0f s.",
                    self.dp_rank,
                    self.host,
                    self.port,
                    exc.strerror or exc,
                    self.engine,
                    self.engine,
                    BIND_RETRY_SECONDS,
                )
            return False
        server.start()
        self.server = server
        if not first:
            self.log.warning(
                "kvcache shim: port free again; KV stats for DP rank %d at http://%s:%d/v1/kv/stats",
                self.dp_rank,
                self.host,
                server.port,
            )
        return True

    def _keep_trying(self) -> None:
        while not self._stop.wait(BIND_RETRY_SECONDS):
            if self._try_bind(first=False):
                return

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.stop()
