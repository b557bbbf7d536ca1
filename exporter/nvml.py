"""GPU memory and utilisation from NVML (pynvml, from the nvidia-ml-py package).

``auto`` turns NVML on when a driver answers and off otherwise (logged once); ``on`` makes a
missing driver a startup error. A device that fails mid-run (GPU lost, Xid) is counted and
skipped, never fatal: the KV metrics matter more than one GPU's memory figure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .errors import NvmlTimeout, NvmlUnavailable

log = logging.getLogger(__name__)

NVML_MODULE_ENV = "KVCACHE_EXPORTER_PYNVML"


__all__ = ["NvmlTimeout", "NvmlUnavailable"]


class _Worker:
    """One daemon thread that makes the NVML calls.

    A hung driver call can never be interrupted, only abandoned: the caller stops waiting at its
    deadline, the hung thread is a daemon (it does not hold up the process's exit), and no new
    call is queued behind it until it returns.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], list[GpuReading]], concurrent.futures.Future[list[GpuReading]]]
        ] = queue.SimpleQueue()
        self.busy = False
        threading.Thread(target=self._run, name="kvcache-nvml", daemon=True).start()

    def _run(self) -> None:
        while True:
            job, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                self.busy = False
                continue  # given up on before it started
            self.busy = True
            try:
                future.set_result(job())
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                self.busy = False

    def submit(
        self, job: Callable[[], list[GpuReading]]
    ) -> concurrent.futures.Future[list[GpuReading]]:
        future: concurrent.futures.Future[list[GpuReading]] = concurrent.futures.Future()
        self.busy = True  # until the worker has finished it
        self._jobs.put((job, future))
        return future


@dataclass(frozen=True, slots=True)
class GpuReading:
    index: int
    uuid: str
    name: str
    memory_used: int
    memory_free: int
    memory_total: int
    utilization: float | None  # 0-1; None where the device does not report it


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlReader:
    def __init__(self, module: ModuleType | None = None) -> None:
        self._nvml = module
        self.errors: dict[tuple[str, str], int] = {}
        self.available = False
        self._worker: _Worker | None = None

    def start(self, mode: str) -> bool:
        """Initialise NVML per ``mode`` (auto/on/off); returns whether it is in use."""
        if mode == "off":
            return False
        try:
            if self._nvml is None:
                # KVCACHE_EXPORTER_PYNVML names a pynvml-compatible module instead (tests on
                # machines without a GPU, or NVML wrappers); unset, it is pynvml itself.
                self._nvml = importlib.import_module(os.environ.get(NVML_MODULE_ENV) or "pynvml")
            self._nvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors
            if mode == "on":
                raise NvmlUnavailable(f"nvml: on, but NVML cannot start: {exc}") from exc
            log.info("NVML not available (%s); GPU metrics are off", exc)
            return False
        self.available = True
        self._worker = _Worker()
        return True

    async def read_within(self, deadline: float) -> list[GpuReading]:
        """``read()`` on the NVML thread, given up after ``deadline`` seconds (counted as a
        ``NvmlTimeout``; the GPU series then go until NVML answers again)."""
        if not self.available or self._worker is None:
            return []
        if self._worker.busy:
            self._count_error("all", NvmlTimeout("an earlier NVML call has not returned"))
            return []
        future = self._worker.submit(self.read)
        try:
            async with asyncio.timeout(deadline):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            self._count_error("all", NvmlTimeout(f"no answer within {deadline:g} s"))
            return []

    def stop(self) -> None:
        if self._worker is not None and self._worker.busy:
            log.warning("NVML is hung: not calling nvmlShutdown, exiting without it")
            self.available = False
            return
        if self.available and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("nvmlShutdown: %s", exc)
        self.available = False

    def _count_error(self, gpu: str, exc: Exception) -> None:
        reason = type(exc).__name__
        key = (gpu, reason)
        self.errors[key] = self.errors.get(key, 0) + 1
        if self.errors[key] == 1:
            log.warning("NVML error on GPU %s: %s", gpu, exc)

    def read(self) -> list[GpuReading]:
        """One reading per device that answered; failing devices are counted and skipped."""
        if not self.available or self._nvml is None:
            return []
        nvml = self._nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:
            self._count_error("all", exc)
            return []
        readings = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    util: float | None = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
                except Exception as exc:  # e.g. NVMLError_NotSupported on some MIG setups
                    self._count_error(str(index), exc)
                    util = None
                readings.append(
                    GpuReading(
                        index=index,
                        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                        name=_text(nvml.nvmlDeviceGetName(handle)),
                        memory_used=int(memory.used),
                        memory_free=int(memory.free),
                        memory_total=int(memory.total),
                        utilization=util,
                    )
                )
            except Exception as exc:
                self._count_error(str(index), exc)
        return readings
