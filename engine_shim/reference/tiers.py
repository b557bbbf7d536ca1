"""Cache tiers below the device pool: host DRAM (L2) and storage on disk (L3).

Blocks are keyed by their prefix hash chain, so a tier hit means the whole prefix up to that
block matched. Storage files are named by the hash and survive engine restarts (HiCache L3).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class HostTier:
    """Evicted device blocks backed up into one pinned-size CPU tensor, LRU."""

    def __init__(
        self, capacity_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype
    ) -> None:
        self.capacity_blocks = capacity_blocks
        self.data = torch.zeros(capacity_blocks, *block_shape, dtype=dtype)
        self._slots: OrderedDict[bytes, int] = OrderedDict()
        self._free = list(range(capacity_blocks - 1, -1, -1))

    @property
    def used_blocks(self) -> int:
        return len(self._slots)

    def put(self, key: bytes, block: torch.Tensor) -> None:
        if self.capacity_blocks == 0:
            return
        if key in self._slots:
            self._slots.move_to_end(key)
            return
        if self._free:
            slot = self._free.pop()
        else:
            _, slot = self._slots.popitem(last=False)
        self.data[slot].copy_(block)
        self._slots[key] = slot

    def get(self, key: bytes) -> torch.Tensor | None:
        slot = self._slots.get(key)
        if slot is None:
            return None
        self._slots.move_to_end(key)
        return self.data[slot]


class StorageTier:
    """Blocks persisted as files, written through by a background thread off the engine loop."""

    SUFFIX = ".kvblock"

    def __init__(self, directory: Path, capacity_blocks: int) -> None:
        self.directory = directory
        self.capacity_blocks = capacity_blocks
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, None] = OrderedDict()
        files = sorted(directory.glob(f"*{self.SUFFIX}"), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                self._index[bytes.fromhex(path.stem)] = None
            except ValueError:
                log.warning("ignoring a file that is not a KV block: %s", path)
        self._trim()
        self._queue: queue.Queue[tuple[bytes, torch.Tensor] | None] = queue.Queue()
        self._writer = threading.Thread(
            target=self._write_loop, name="kv-storage-writer", daemon=True
        )
        self._writer.start()

    @property
    def used_blocks(self) -> int:
        with self._lock:
            return len(self._index)

    def _path(self, key: bytes) -> Path:
        return self.directory / f"{key.hex()}{self.SUFFIX}"

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    def put(self, key: bytes, block: torch.Tensor) -> None:
        """Queue a copy for writing; the engine loop never waits on the disk."""
        if self.capacity_blocks == 0 or self.contains(key):
            return
        self._queue.put((key, block.to("cpu", copy=True)))

    def get(self, key: bytes) -> torch.Tensor | None:
        if not self.contains(key):
            return None
        try:
            data = torch.load(self._path(key), weights_only=True)
        except (OSError, RuntimeError, EOFError) as exc:
            log.warning("storage tier: unreadable block %s: %s", key.hex(), exc)
            with self._lock:
                self._index.pop(key, None)
            return None
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        return data if isinstance(data, torch.Tensor) else None

    def flush(self) -> None:
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join(timeout=10)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                key, data = item
                if self.contains(key):
                    continue
                path = self._path(key)
                tmp = path.with_suffix(".tmp")
                torch.save(data, tmp)
                os.replace(tmp, path)  # readers never see a half-written block
                with self._lock:
                    self._index[key] = None
                    self._trim()
            except OSError as exc:
                log.warning("storage tier: write failed: %s", exc)
            finally:
                self._queue.task_done()

    def _trim(self) -> None:
        while len(self._index) > self.capacity_blocks:
            key, _ = self._index.popitem(last=False)
            self._path(key).unlink(missing_ok=True)
