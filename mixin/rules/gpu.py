"""GPU memory: near full; and the dcgm-exporter join."""

from __future__ import annotations

from ..config import MixinConfig
from .common import Rule, alert


def alerts(c: MixinConfig) -> list[Rule]:
    return [
        alert(
            c,
            "KVCacheGPUMemoryNearFull",
            'kvcache_gpu_memory_bytes{state="used"}\n  / ignoring (state)\n'
            f"kvcache_gpu_memory_total_bytes > {c.gpu_memory_full}\n",
            c.gpu_memory_full_for,
            "warning",
            f"GPU memory above {c.gpu_memory_full:.0%} (NVML).",
            "GPU {{ $labels.gpu }} ({{ $labels.uuid }}) of {{ $labels.instance }} has"
            " {{ $value | humanizePercentage }} of its memory in use: activations or another"
            " process may run out of memory.",
        ),
    ]


def gpu_join_rules(c: MixinConfig) -> list[Rule]:
    """dcgm-exporter's framebuffer (MiB, by ``UUID``) per engine, through the exporter's
    ``kvcache_gpu_engine_info`` (by ``uuid``): GPU attribution without NVML in the sidecar."""
    selector = f"{{{c.dcgm_selector}}}" if c.dcgm_selector else ""
    out = []
    for state, series in (("used", "DCGM_FI_DEV_FB_USED"), ("free", "DCGM_FI_DEV_FB_FREE")):
        out.append(
            {
                "record": f"engine:kvcache_gpu_memory_{state}_bytes:dcgm",
                "expr": "max without (gpu) (kvcache_gpu_engine_info)\n"
                "  * on (uuid) group_left ()\n"
                f'max by (uuid) (label_replace({series}{selector}, "uuid", "$1", "UUID", "(.+)"))\n'
                "  * 1024 * 1024\n",
            }
        )
    return out
