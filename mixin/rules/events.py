"""KV event streams: lost batches, silence."""

from __future__ import annotations

from ..config import MixinConfig
from .common import Rule, alert


def alerts(c: MixinConfig) -> list[Rule]:
    return [
        # A KV event stream with sequence gaps the replay could not fill: the resident counts
        # and evictable bounds from it are withheld until the engine clears or restarts.
        alert(
            c,
            "KVCacheEventStreamLost",
            f"increase(kvcache_events_batches_lost_total[{c.event_stream_lost_lookback}]) > 0",
            c.event_stream_lost_for,
            "warning",
            "A KV event stream lost batches: its resident-block counts are unknown.",
            'kvcache-exporter {{ $labels.instance }} lost {{ printf "%.0f" $value }} KV event'
            f" batches of {{{{ $labels.engine }}}} (DP rank {{{{ $labels.dp_rank }}}}) in the last"
            f" {c.event_stream_lost_lookback}, and its replay socket could not bring them back:"
            " prefix-resident slots and evictable bounds from that stream are withheld until"
            " the engine clears its prefix cache or restarts.",
        ),
        # Events come with every block an engine fills: a busy engine whose stream says
        # nothing has a broken publisher, a wrong endpoint or topic, or a network in between.
        alert(
            c,
            "KVCacheEventStreamSilent",
            f"kvcache_events_last_batch_age_seconds > {c.event_stream_silent_seconds}\n"
            '  and ignoring (model, state)\nkvcache_requests{state="running"} > 0\n',
            c.event_stream_silent_for,
            "warning",
            "A KV event stream is silent while its engine is busy.",
            "{{ $labels.engine }} (DP rank {{ $labels.dp_rank }}) runs requests, but"
            " kvcache-exporter {{ $labels.instance }} has had no KV event batch from it for"
            " {{ $value | humanizeDuration }}: the stream is broken (publisher off, wrong"
            " endpoint or topic, or a network in between), and what it would show is stale.",
        ),
    ]
