"""Recording rules: per-engine rates and ratios, fleet and model rows, the what-if curve read
at this engine's sizes."""

from __future__ import annotations

from ..config import MixinConfig
from .common import Rule
from .reuse import reuse_rules


def recording_rules(c: MixinConfig) -> list[Rule]:
    hit, query = "kvcache_prefix_hit_tokens_total", "kvcache_prefix_query_tokens_total"
    full = f'pool="{c.pool}"'
    fleet = c.fleet_by("model")
    rules: list[Rule] = []
    for window in ("5m", "1h"):
        rules.append(
            {
                "record": f"engine:kvcache_prefix_hit_ratio:rate{window}",
                "expr": f"sum without (tier) (rate({hit}[{window}]))\n"
                f"  /\n(rate({query}[{window}]) > 0)\n",
            }
        )
    rules += [
        {
            "record": "engine_tier:kvcache_prefix_hit_ratio:rate5m",
            "expr": f"rate({hit}[5m])\n"
            f"  / ignoring (tier) group_left ()\n(rate({query}[5m]) > 0)\n",
        },
        {
            "record": "engine:kvcache_preemptions:rate5m",
            "expr": "rate(kvcache_preemptions_total[5m])",
        },
        {
            "record": "engine:kvcache_evicted_tokens:rate5m",
            "expr": "rate(kvcache_evicted_tokens_total[5m])",
        },
        {
            "record": "model:kvcache_active_usage:ratio",
            "expr": f'sum by ({fleet}) (kvcache_pool_slots{{state="used", {full}}})\n'
            f"  /\nsum by ({fleet}) (kvcache_pool_capacity_slots{{{full}}})\n",
        },
        {
            # Only engines that can see evictable tokens (not vLLM's /metrics bridge).
            "record": "model:kvcache_physical_usage:ratio",
            "expr": f'sum by ({fleet}) (kvcache_pool_slots{{state=~"used|evictable", {full}}}\n'
            f'  and ignoring (state) kvcache_pool_slots{{state="evictable"}})\n'
            f"  /\nsum by ({fleet}) (kvcache_pool_capacity_slots{{{full}}}\n"
            f'  and ignoring (state) kvcache_pool_slots{{state="evictable"}})\n',
        },
        {
            "record": "model:kvcache_max_concurrency:sum",
            "expr": f"sum by ({fleet}) (kvcache_max_concurrency)",
        },
        {
            "record": "model:kvcache_requests_running:sum",
            "expr": f'sum by ({fleet}) (kvcache_requests{{state="running"}})',
        },
        {
            # The forecast, or +Inf for an engine whose usage is not growing: the fleet panel's
            # "soonest first" over 1,000 engines, computed once per evaluation instead of an
            # `or` over every engine at every step of a 6 h range (1.2 s, measured).
            "record": "engine:kvcache_exhaustion_eta_seconds:or_inf",
            "expr": "kvcache_exhaustion_eta_seconds\n"
            "  or\nkvcache_max_model_len_tokens * 0 + Inf\n",
        },
        {
            "record": "model:kvcache_engines:count",
            "expr": f"count by ({fleet}) (kvcache_engine_info)",
        },
        *reuse_rules(c),
    ]
    return rules
