"""The exporter and its targets: down, unsupported, absent, stale."""

from __future__ import annotations

from ..config import MixinConfig
from .common import WHO, Rule, alert


def alerts(c: MixinConfig) -> list[Rule]:
    exporter_up = f"up{{{c.exporter_selector}}}"
    fleet = c.fleet_by()
    return [
        alert(
            c,
            "KVCacheTargetDown",
            "kvcache_exporter_target_up == 0",
            c.target_down_for,
            "critical",
            "The exporter cannot read an engine's KV stats.",
            "kvcache-exporter {{ $labels.instance }} has failed to poll {{ $labels.engine }} for"
            f" {c.target_down_for}: the engine (or its shim) is down or unreachable, and its KV"
            " cache is not being watched.",
        ),
        # The shim answers, but does not recognise its vLLM: serving goes on, the numbers are
        # partial (no evictable count, so no physical usage or headroom alerts for it).
        alert(
            c,
            "KVCacheShimUnsupportedEngine",
            'increase(kvcache_exporter_poll_errors_total{reason="unsupported_engine"}[5m]) > 0',
            c.unsupported_engine_for,
            "warning",
            "The vLLM shim does not recognise its vLLM release: KV stats are partial.",
            "kvcache-exporter {{ $labels.instance }} polls {{ $labels.engine }}, whose shim does"
            " not recognise the installed vLLM: vLLM serves, but only used and free blocks are"
            " published (no evictable count, physical usage or headroom). The reason is in the"
            " shim's ERROR line in vLLM's log and in the exporter's log.",
        ),
        # Per deployment (fleet labels): every exporter scraped there within the lookback is
        # gone or failing. absent() covers a Prometheus that never scraped one at all.
        alert(
            c,
            "KVCacheExporterAbsent",
            f"(\n  count by ({fleet}) (max_over_time({exporter_up}[{c.exporter_lost_lookback}]))\n"
            f"    unless\n  count by ({fleet}) ({exporter_up} == 1)\n)\n"
            f"  or on ()\nabsent({exporter_up} == 1)\n",
            c.exporter_absent_for,
            "critical",
            "No kvcache-exporter is being scraped.",
            "Prometheus has scraped no kvcache-exporter successfully for"
            f" {c.exporter_absent_for}{{{{ with $labels.cluster }}}} in cluster {{{{ . }}}}"
            "{{ end }}{{ with $labels.namespace }} (namespace {{ . }}){{ end }}:"
            " every KV cache alert there is blind.",
            job="kvcache-exporter",  # absent() carries no labels: route on this one
        ),
        alert(
            c,
            "KVCacheStaleData",
            f"time() - kvcache_snapshot_timestamp_seconds > {c.stale_after_seconds}",
            c.stale_for,
            "warning",
            "An engine serves KV stats older than a minute.",
            f"{WHO} answers, but its newest snapshot is {{{{ $value | humanizeDuration }}}} old:"
            " its scheduler loop may be stuck.",
        ),
    ]
