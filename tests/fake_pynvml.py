"""A small, honest stand-in for pynvml: the calls the exporter makes, on scripted devices.

This machine has no GPU, so NVML is the one thing tests fake. Devices are plain data; setting
``lost = True`` makes a device fail the way a GPU that fell off the bus does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    pass


@dataclass
class FakeDevice:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * 2**30
    used: int = 0
    utilization: int = 0
    lost: bool = False
    hung: bool = False  # the driver call never returns (a wedged GPU)


class FakeNvml:
    def __init__(self, devices: list[FakeDevice] | None = None, driver: bool = True) -> None:
        self.devices = devices or []
        self.driver = driver
        self.initialised = False

    def nvmlInit(self) -> None:
        if not self.driver:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        device = self.devices[index]
        if device.lost:
            raise NVMLError_GpuIsLost("GPU is lost")
        return device

    def nvmlDeviceGetMemoryInfo(self, device: FakeDevice) -> SimpleNamespace:
        while device.hung:
            time.sleep(0.05)  # as a wedged driver: no answer, no error
        return SimpleNamespace(
            total=device.total, used=device.used, free=device.total - device.used
        )

    def nvmlDeviceGetUtilizationRates(self, device: FakeDevice) -> SimpleNamespace:
        return SimpleNamespace(gpu=device.utilization, memory=0)

    def nvmlDeviceGetUUID(self, device: FakeDevice) -> str:
        return device.uuid

    def nvmlDeviceGetName(self, device: FakeDevice) -> str:
        return device.name
