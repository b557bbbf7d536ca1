"""A live one-line-per-engine terminal view of an exporter's ``/metrics``.

    ref/0 reference-tiny  phys 72.1% (active 2.3%, evictable 69.8%) 53591/82448 tok |
    max conc 13.9 | headroom 9 | run 3 wait 0 | hit dev 61% host 7% sto 1% |
    if KV x0.5 40% x1 62% x2 70% x4 74%, working set 1.6x

Hit ratios are over the last refresh (rates, not lifetime averages) once two scrapes exist;
the "if KV" part is the what-if curve (engines that publish reuse distances) at multiples of
the pool, and the working set (90 % of the hits at 64x) as a multiple of the pool. The curve is
read over a window of minutes (``WHAT_IF_WINDOW_SECONDS``), never one refresh: a sampled
histogram over a few seconds holds a few hundred lookups and swings by tens of points. Until
the window has passed it shows the curve since the engine started, marked as warming up.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvstats.reuse import curve_at, working_set

EngineKey = tuple[str, str, str]  # engine, dp_rank, model
TIER_SHORT = {"device": "dev", "host": "host", "storage": "sto", "p2p": "p2p", "external": "ext"}


REUSE = "kvcache_prefix_reuse_distance_tokens"
WHAT_IF_MULTIPLES = (0.5, 1, 2, 4)
WHAT_IF_WINDOW_SECONDS = 300.0


@dataclass
class EngineSample:
    pools: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    values: dict[str, float] = field(default_factory=dict)
    hits: dict[str, float] = field(default_factory=dict)
    reuse: dict[float, float] = field(default_factory=dict)  # finite bucket bound -> count
    marks: dict[str, float] = field(default_factory=dict)  # mark -> bucket bound


def parse_exposition(text: str) -> tuple[dict[EngineKey, EngineSample], dict[str, float]]:
    """Engines' samples, and target_up by engine name."""
    engines: dict[EngineKey, EngineSample] = defaultdict(EngineSample)
    up: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            try:
                _add_sample(engines, up, s.name, s.labels, s.value)
            except (KeyError, ValueError):  # a label missing or not a number: skipped
                continue
    return dict(engines), up


def _add_sample(
    engines: dict[EngineKey, EngineSample],
    up: dict[str, float],
    name: str,
    labels: dict[str, str],
    value: float,
) -> None:
    if name == "kvcache_exporter_target_up":
        up[labels["engine"]] = value
        return
    if not name.startswith("kvcache_") or "dp_rank" not in labels:
        return
    sample = engines[(labels["engine"], labels["dp_rank"], labels.get("model", ""))]
    if "pool" in labels:
        key = name + (f":{labels['state']}" if "state" in labels else "")
        sample.pools[labels["pool"]][key] = value
    else:
        reader = SAMPLE_READERS.get(name)
        if reader is None:
            sample.values[name] = value
        else:
            reader(sample, labels, value)


def _hits(sample: EngineSample, labels: dict[str, str], value: float) -> None:
    sample.hits[labels["tier"]] = value


def _requests(sample: EngineSample, labels: dict[str, str], value: float) -> None:
    sample.values[f"requests:{labels['state']}"] = value


def _status(sample: EngineSample, labels: dict[str, str], value: float) -> None:
    if value == 1:
        sample.values[f"status:{labels['state']}"] = 1


def _reuse_bucket(sample: EngineSample, labels: dict[str, str], value: float) -> None:
    if labels["le"] != "+Inf":
        sample.reuse[float(labels["le"])] = value


def _reuse_mark(sample: EngineSample, labels: dict[str, str], value: float) -> None:
    sample.marks[labels["mark"]] = float(labels["bound"])


# Engine series that are not one plain value, by name: where each lands in the sample.
SAMPLE_READERS: dict[str, Callable[[EngineSample, dict[str, str], float], None]] = {
    "kvcache_prefix_hit_tokens_total": _hits,
    "kvcache_requests": _requests,
    "kvcache_shim_status": _status,
    f"{REUSE}_bucket": _reuse_bucket,
    "kvcache_prefix_reuse_bucket_info": _reuse_mark,
}


def _pct(value: float | None) -> str:
    return "  -  " if value is None else f"{100 * value:.1f}%"


@dataclass(frozen=True)
class Reuse:
    """An engine's reuse histogram at one scrape: enough to difference two of them."""

    at: float
    count: float
    buckets: dict[float, float]

    @classmethod
    def of(cls, sample: EngineSample, at: float) -> Reuse | None:
        count = sample.values.get(f"{REUSE}_count")
        return None if count is None or not sample.reuse else cls(at, count, dict(sample.reuse))


@dataclass(frozen=True)
class WhatIfBase:
    """Where the what-if window starts: ``reuse`` (None: the engine's start) ``seconds`` ago,
    for a window of ``window`` seconds."""

    reuse: Reuse | None
    seconds: float
    window: float


class ReuseHistory:
    """Each engine's recent reuse histograms, enough to read the curve over the last window."""

    def __init__(self, window: float = WHAT_IF_WINDOW_SECONDS) -> None:
        self.window = window
        self._kept: dict[EngineKey, deque[Reuse]] = {}

    def add(self, key: EngineKey, sample: EngineSample, at: float) -> WhatIfBase | None:
        reuse = Reuse.of(sample, at)
        if reuse is None:
            self._kept.pop(key, None)
            return None
        kept = self._kept.setdefault(key, deque())
        if kept and (
            reuse.count < kept[-1].count or reuse.buckets.keys() != kept[-1].buckets.keys()
        ):
            kept.clear()  # the engine restarted (counts fell) or resized its pool: start again
        kept.append(reuse)
        while len(kept) > 1 and at - kept[1].at >= self.window:
            kept.popleft()  # keep the newest scrape at least a window old
        oldest = kept[0]
        if at - oldest.at >= self.window:
            return WhatIfBase(oldest, at - oldest.at, self.window)
        return WhatIfBase(None, at - oldest.at, self.window)

    def forget_except(self, keys: set[EngineKey]) -> None:
        for key in set(self._kept) - keys:
            del self._kept[key]


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{round(seconds / 3600, 1):g}h"
    return f"{round(seconds / 60, 1):g}m" if seconds >= 60 else f"{seconds:.0f}s"


# Engine-wide values shown when present: (value key, how it reads).
ENGINE_FIELDS: tuple[tuple[str, Callable[[dict[str, float]], str]], ...] = (
    ("status:warming_up", lambda v: "WARMING UP (capacity not sized yet)"),
    (
        "status:unsupported",
        lambda v: "UNSUPPORTED engine release (exact counts only: see the exporter log)",
    ),
    ("kvcache_capacity_tokens", lambda v: f"cap {v['kvcache_capacity_tokens']:.0f} tok"),
    ("kvcache_max_concurrency", lambda v: f"max conc {v['kvcache_max_concurrency']:.1f}"),
    ("kvcache_concurrency_headroom", lambda v: f"headroom {v['kvcache_concurrency_headroom']:.0f}"),
    (
        "requests:running",
        lambda v: f"run {v['requests:running']:.0f} wait {v.get('requests:waiting', 0):.0f}",
    ),
    (
        "kvcache_exhaustion_eta_seconds",
        lambda v: f"full in {v['kvcache_exhaustion_eta_seconds']:.0f}s",
    ),
)


def _pool_part(prefix: str, pool: dict[str, float]) -> str:
    cap = pool.get("kvcache_pool_capacity_slots", 0.0)
    used = pool.get("kvcache_pool_slots:used", 0.0)
    evictable = pool.get("kvcache_pool_slots:evictable")
    if evictable is None:
        text = (
            f"{prefix}active {_pct(pool.get('kvcache_active_usage_ratio'))}"
            f" (evictable unknown) {used:.0f}/{cap:.0f} slots"
        )
    else:
        text = (
            f"{prefix}phys {_pct(pool.get('kvcache_physical_usage_ratio'))}"
            f" (active {_pct(pool.get('kvcache_active_usage_ratio'))},"
            f" evictable {_pct(pool.get('kvcache_evictable_ratio'))})"
            f" {used + evictable:.0f}/{cap:.0f} slots"
        )
    peak = pool.get("kvcache_pool_peak_slots:used")
    return text if peak is None or cap <= 0 else f"{text} peak {_pct(peak / cap)}"


def _hit_part(now: EngineSample, before: EngineSample | None) -> str | None:
    """Hit ratios by tier since the previous refresh."""
    queries = now.values.get("kvcache_prefix_query_tokens_total")
    if queries is None or not now.hits:
        return None
    base_q = before.values.get("kvcache_prefix_query_tokens_total", 0.0) if before else 0.0
    dq = queries - base_q
    if dq <= 0:
        return "hit (no queries)"
    hit_parts = []
    for tier in TIER_SHORT:
        if tier in now.hits:
            dh = now.hits[tier] - (before.hits.get(tier, 0.0) if before else 0.0)
            hit_parts.append(f"{TIER_SHORT[tier]} {100 * dh / dq:.0f}%")
    return "hit " + " ".join(hit_parts)


def format_engine_line(
    key: EngineKey,
    now: EngineSample,
    before: EngineSample | None,
    what_if_base: WhatIfBase | None = None,
) -> str:
    engine, rank, model = key
    pools = sorted(now.pools.items(), key=lambda p: p[0] != "full")
    parts = [_pool_part("" if i == 0 else f"{name} ", pool) for i, (name, pool) in enumerate(pools)]
    parts += [show(now.values) for field, show in ENGINE_FIELDS if field in now.values]
    hits = _hit_part(now, before)
    if hits is not None:
        parts.append(hits)
    what_if = format_what_if(now, what_if_base)
    if what_if:
        parts.append(what_if)
    return f"{engine}/{rank} {model}  " + " | ".join(parts)


def format_what_if(now: EngineSample, base: WhatIfBase | None) -> str:
    """The what-if curve at multiples of the pool: over the window once it has passed, since
    the engine started (marked) until then, or since the engine started when no window is
    kept (one scrape)."""
    pool = now.marks.get("pool")
    count = now.values.get(f"{REUSE}_count")
    if pool is None or count is None or not now.reuse:
        return ""
    bounds = sorted(now.reuse)
    cumulative = [now.reuse[b] for b in bounds]
    if base is None:
        span = "since the engine started"
    elif base.reuse is None:
        span = f"warming up: {_duration(base.seconds)} of {_duration(base.window)}, since start"
    else:
        span = f"last {_duration(base.seconds)}"
        cumulative = [c - base.reuse.buckets[b] for b, c in zip(bounds, cumulative, strict=True)]
        count -= base.reuse.count
    if count <= 0:
        return f"if KV ({span}): no lookups"
    ratios = [curve_at(bounds, cumulative, count, pool * m) for m in WHAT_IF_MULTIPLES]
    rate = now.values.get("kvcache_prefix_reuse_sampling_ratio", 1.0)
    sampled = "" if rate >= 1 else f", sampled {rate:.0%}"
    text = f"if KV ({span}{sampled}) " + " ".join(
        f"x{m:g} {100 * (r or 0):.0f}%" for m, r in zip(WHAT_IF_MULTIPLES, ratios, strict=True)
    )
    size = working_set(bounds, cumulative, 0.9)
    return text if size is None else f"{text}, working set {size / pool:.1f}x"


def render_lines(
    engines: dict[EngineKey, EngineSample],
    up: dict[str, float],
    before: dict[EngineKey, EngineSample],
    what_if_bases: dict[EngineKey, WhatIfBase | None] | None = None,
) -> list[str]:
    bases = what_if_bases or {}
    lines = [
        format_engine_line(k, engines[k], before.get(k), bases.get(k)) for k in sorted(engines)
    ]
    lines += [f"{name}  DOWN (target_up 0)" for name, value in sorted(up.items()) if value == 0]
    return lines


class LiveView:
    """Prints one stamped line per engine for each scrape: hit ratios since the last one, the
    what-if curve over the last ``what_if_window`` seconds."""

    def __init__(
        self,
        out: Callable[[str], None] = print,
        what_if_window: float = WHAT_IF_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.clock = clock
        self.before: dict[EngineKey, EngineSample] = {}
        self.history = ReuseHistory(what_if_window)

    def show(self, exposition: str, empty: str = "(no engines yet)") -> None:
        engines, up = parse_exposition(exposition)
        at, stamp = self.clock(), time.strftime("%H:%M:%S")
        bases = {key: self.history.add(key, sample, at) for key, sample in engines.items()}
        self.history.forget_except(set(engines))
        for line in render_lines(engines, up, self.before, bases) or [empty]:
            self.out(f"{stamp} {line}")
        self.before = engines


# Terminal control characters (C0 but tab, DEL, C1): a label value could move the cursor,
# retitle the window or start a fake line; shown escaped instead.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
MAX_BODY_BYTES = 32 * 1024 * 1024


def printable(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class ScrapeError(Exception):
    """The exporter's answer could not be used (status, size, time)."""


def fetch(client: httpx.Client, url: str, deadline: float) -> str:
    """The body of one scrape within ``deadline`` seconds in all (a server that drips one byte
    at a time never trips a per-read timeout) and ``MAX_BODY_BYTES``."""
    started = time.monotonic()
    with client.stream("GET", url) as response:
        if response.status_code != 200:
            raise ScrapeError(f"HTTP {response.status_code}")
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ScrapeError(f"body over {MAX_BODY_BYTES // 2**20} MiB")
            if time.monotonic() - started > deadline:
                raise ScrapeError(f"no complete answer within {deadline:g} s")
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def watch(
    url: str,
    interval: float,
    iterations: int | None = None,
    out: Callable[[str], None] = print,
    deadline: float = 5.0,
    what_if_window: float = WHAT_IF_WINDOW_SECONDS,
) -> int:
    view = LiveView(lambda line: out(printable(line)), what_if_window)
    count = 0
    with httpx.Client(timeout=deadline) as client:
        while iterations is None or count < iterations:
            stamp = time.strftime("%H:%M:%S")
            try:
                text = fetch(client, url, deadline)
            except (httpx.HTTPError, ScrapeError) as exc:
                out(printable(f"{stamp} cannot scrape {url}: {exc}"))
            else:
                try:
                    view.show(text)
                except Exception as exc:  # not the Prometheus text format: say so, go on
                    problem = f"{type(exc).__name__}: {exc}"[:300]
                    out(printable(f"{stamp} unreadable /metrics from {url}: {problem}"))
            count += 1
            if iterations is None or count < iterations:
                time.sleep(interval)
    return 0
