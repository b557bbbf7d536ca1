"""tests.fake_pynvml as an importable module, for an exporter *process* on a machine with no GPU.

``KVCACHE_EXPORTER_PYNVML=tests.fake_nvml_module`` makes the exporter use it; the devices come
from ``FAKE_NVML_DEVICES`` (a JSON list of FakeDevice fields).
"""

from __future__ import annotations

import json
import os

from tests.fake_pynvml import FakeDevice, FakeNvml, NVMLError  # noqa: F401 (pynvml's names)

_nvml = FakeNvml([FakeDevice(**d) for d in json.loads(os.environ.get("FAKE_NVML_DEVICES", "[]"))])

nvmlInit = _nvml.nvmlInit
nvmlShutdown = _nvml.nvmlShutdown
nvmlDeviceGetCount = _nvml.nvmlDeviceGetCount
nvmlDeviceGetHandleByIndex = _nvml.nvmlDeviceGetHandleByIndex
nvmlDeviceGetMemoryInfo = _nvml.nvmlDeviceGetMemoryInfo
nvmlDeviceGetUtilizationRates = _nvml.nvmlDeviceGetUtilizationRates
nvmlDeviceGetUUID = _nvml.nvmlDeviceGetUUID
nvmlDeviceGetName = _nvml.nvmlDeviceGetName
