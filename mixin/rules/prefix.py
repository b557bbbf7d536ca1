"""The prefix cache: eviction thrash and a collapsing hit ratio."""

from __future__ import annotations

from ..config import MixinConfig
from .common import WHO, Rule, alert


def alerts(c: MixinConfig) -> list[Rule]:
    full = f'pool="{c.pool}"'
    return [
        alert(
            c,
            "KVCacheEvictionThrash",
            "(\n  engine:kvcache_evicted_tokens:rate5m\n"
            f"    / ignoring (pool)\n  kvcache_pool_capacity_slots{{{full}}}\n)"
            f" > {c.thrash_evicted_pool_fraction}\n"
            "  and\nengine:kvcache_prefix_hit_ratio:rate5m"
            f" < {c.thrash_hit_ratio_drop} * engine:kvcache_prefix_hit_ratio:rate1h\n",
            c.thrash_for,
            "warning",
            "Prefix cache thrashing - evicting fast while the hit ratio falls.",
            f"{WHO} evicts {{{{ $value | humanizePercentage }}}} of its pool per second while its"
            f" prefix hit ratio is below {c.thrash_hit_ratio_drop:.0%} of its hourly level.",
        ),
        alert(
            c,
            "KVCachePrefixHitRatioCollapse",
            "engine:kvcache_prefix_hit_ratio:rate5m"
            f" < {c.collapse_hit_ratio_drop} * engine:kvcache_prefix_hit_ratio:rate1h\n"
            f"  and\nengine:kvcache_prefix_hit_ratio:rate1h > {c.collapse_min_hourly_hit_ratio}\n"
            "  and\nrate(kvcache_prefix_query_tokens_total[5m])"
            f" > {c.collapse_min_query_tokens_per_second:g}\n",
            c.collapse_for,
            "warning",
            "Prefix cache hit ratio fell to under half its hourly level.",
            f"{WHO}: prefix hit ratio {{{{ $value | humanizePercentage }}}} over 5 minutes.",
        ),
    ]
