"""The what-if curve: its recording rules (the hit ratio at this engine's sizes, the working set,
the KV a hit ratio needs) and a working set that outgrew the pool."""

from __future__ import annotations

from ..config import MixinConfig
from .common import WHO, Rule, alert


def alerts(c: MixinConfig) -> list[Rule]:
    full = f'pool="{c.pool}"'
    at_size = f"engine_mark:kvcache_prefix_hit_ratio_at_size:rate{c.working_set_lookback}"
    return [
        # Capacity planning, not an outage: more KV memory would buy real hits.
        alert(
            c,
            "KVCachePrefixWorkingSetOutgrowsPool",
            f"engine:kvcache_prefix_working_set_tokens:rate{c.working_set_lookback}\n"
            f"  > ignoring (pool) kvcache_pool_capacity_slots{{{full}}}\n"
            "and ignoring (mark)\n(\n"
            f'  {at_size}{{mark="top"}}\n'
            "    - ignoring (mark)\n"
            f'  {at_size}{{mark="pool"}}\n'
            f") > {c.working_set_min_gain}\n"
            f"and\nrate(kvcache_prefix_reuse_distance_tokens_count[{c.working_set_lookback}])"
            f" > {c.working_set_min_query_tokens_per_second:g}\n",
            c.working_set_for,
            "warning",
            "The prefix cache's working set no longer fits in the KV pool.",
            f"{WHO}: {c.working_set_fraction:.0%} of the achievable prefix hits need"
            " {{ $value | humanize }} tokens of KV, more than the pool holds, and more KV would"
            f" raise the hit ratio by over {c.working_set_min_gain * 100:g} points. See the engine"
            " dashboard's hit ratio vs KV cache size.",
        ),
    ]


REUSE = "kvcache_prefix_reuse_distance_tokens"


def _marked(matcher: str) -> str:
    """Bucket-info series (``mark`` matching), with the bound as ``le`` to join the buckets."""
    return (
        f"label_replace(kvcache_prefix_reuse_bucket_info{{mark{matcher}}},"
        ' "le", "$1", "bound", "(.+)")'
    )


def reuse_rules(c: MixinConfig) -> list[Rule]:
    """The what-if curve read at this engine's sizes, and the working set's size.

    PromQL cannot read a number out of ``le``, so the exporter marks which bound is the pool
    (and pool + tiers, and the largest) in ``kvcache_prefix_reuse_bucket_info``; joining on it
    picks those buckets. The working set is ``histogram_quantile`` over the buckets of *reused*
    tokens only: the largest bound's bucket stands in for +Inf, so cold misses are left out."""
    w = c.working_set_lookback
    top = _marked('="top"')

    def hit_ratio_at(marks: str) -> str:
        return (
            "sum without (le, bound) (\n"
            f"  rate({REUSE}_bucket[{w}])\n"
            f"    * ignoring (bound, mark) group_right ()\n  {marks}\n)\n"
            f"  / ignoring (mark) group_left ()\n(rate({REUSE}_count[{w}]) > 0)\n"
        )

    return [
        {
            "record": f"engine_mark:kvcache_prefix_hit_ratio_at_size:rate{w}",
            "expr": hit_ratio_at(_marked('!=""')),
        },
        {
            "record": f"engine:kvcache_prefix_working_set_tokens:rate{w}",
            "expr": f"histogram_quantile(\n  {c.working_set_fraction},\n"
            f"  label_replace(\n    rate({REUSE}_bucket[{w}]) and ignoring (bound, mark) {top},\n"
            '    "le", "+Inf", "", ""\n  )\n'
            "    or\n"
            f'  (rate({REUSE}_bucket{{le!="+Inf"}}[{w}]) unless ignoring (bound, mark) {top})\n'
            ")\n  > 0\n",
        },
        *(
            {
                # histogram_quantile over every lookup (cold misses in +Inf) is the size whose
                # hit ratio is the target; past the largest bound it would answer that bound,
                # so targets above the ceiling (the hit ratio at 64x) are left out. The ceiling
                # is computed here, not read from the rule above: backfilled rules (promtool
                # create-blocks-from rules) cannot read each other.
                "record": f"engine:kvcache_prefix_kv_for_hit_ratio_tokens:rate{w}",
                "expr": f"histogram_quantile({target}, rate({REUSE}_bucket[{w}]))\n"
                f"  and ignoring (mark)\n(\n{hit_ratio_at(top)}) >= {target}\n",
                "labels": {"target_hit_ratio": f"{target:g}"},
            }
            for target in c.what_if_target_hit_ratios
        ),
    ]
