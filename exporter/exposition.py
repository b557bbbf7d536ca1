"""``/metrics``, rendered incrementally: each target's lines once per change, joined on the
scrape.

A poll hands the exposition its target's new state and returns (no formatting in the poller's
loop). The next scrape renders the targets that changed since the one before, once each, however
many polls that was (label prefixes and unchanged lines are cached per series, so a render
formats only the values that moved); it joins the cached lines of every target under the
families' headers and renders the few fleet-wide series (GPUs, the exporter itself) fresh. The
joined body, and its gzip, are reused until something changes. Work therefore follows the
slower of the poll and scrape rates: 64 targets polled every second and scraped every 15 s are
rendered once per scrape, not fifteen times. The text is format 0.0.4 exactly as
prometheus_client writes it (its own ``floatToGoString``, its label escaping and order):
``tests/exporter/test_exposition.py`` proves the output equal to ``generate_latest`` over the
same data and to the exposition before this renderer, sample for sample.

A target whose series cannot be written (a value past float range, a label that is not valid
UTF-8; the parsers refuse both) is left out of the scrape: its ``target_up`` is 0 and
``kvcache_exporter_render_errors_total`` counts it. It never costs the other targets.
"""

from __future__ import annotations

import gzip
import logging
import platform
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from kvstats.snapshot import ReuseDistances

from . import __version__
from .families import (
    ALL,
    ENGINE_SCOPED,
    EVENT_FAMILIES,
    EXPORTER_FAMILIES,
    GPU_FAMILIES,
    POOL_FAMILIES,
    TARGET_FAMILIES,
    Family,
    PoolState,
    StreamState,
    TargetState,
    Values,
)
from .nvml import GpuReading
from .state import EngineView, ReloadStats, TargetReport
from .textformat import format_value

log = logging.getLogger(__name__)

Row = tuple[tuple[str, ...], float]  # label values in the family's label order, value


# The families of one owner: (name, value) of those with one series, (name, values) of the rest.
ValueTable = tuple[
    tuple[tuple[str, Callable[[Any], Any]], ...], tuple[tuple[str, Callable[[Any], Values]], ...]
]


def _values(families: Sequence[Family]) -> ValueTable:
    """The families' value functions, checked once: each declares exactly one."""
    for family in families:
        assert (family.value is None) != (family.values is None), (
            f"{family.name} must declare one value function: value= or values="
        )
    ones = tuple((f.name, f.value) for f in families if f.value is not None)
    manys = tuple((f.name, f.values) for f in families if f.values is not None)
    return ones, manys


POOL_VALUES = _values(POOL_FAMILIES)
ENGINE_VALUES = _values([f for f in ENGINE_SCOPED if f not in POOL_FAMILIES])
# The poll-duration histogram is written from the report itself (``LineWriter.histogram``).
TARGET_VALUES = _values([f for f in TARGET_FAMILIES if f.type != "histogram"])
STREAM_VALUES = _values(EVENT_FAMILIES)


@dataclass(frozen=True, slots=True)
class ExporterView:
    """Everything one render needs, taken at one instant."""

    targets: Sequence[TargetReport]
    gpus: Sequence[GpuReading]
    nvml_errors: dict[tuple[str, str], int]
    nvml_enabled: bool
    # engine name -> GPU UUIDs from the config, for snapshots that carry none.
    gpu_map: dict[str, tuple[str, ...]]
    reloads: ReloadStats | None = None


# ------------------------------------------------------------------------------- rows


def engine_rows(name: str, rank: int, view: EngineView, rows: dict[str, list[Row]]) -> None:
    """Append one engine's (DP rank's) series to ``rows``, by family name: each family reads
    its own values (``families.py``), per pool or per engine."""
    engine = (name, str(rank), view.model)
    for pool in view.snapshot.pools:
        labels = (*engine, pool.name)
        state = PoolState(pool, view.ratios[pool.name])
        _append(rows, labels, state, POOL_VALUES)
    _append(rows, engine, view, ENGINE_VALUES)


def _append(
    rows: dict[str, list[Row]], labels: tuple[str, ...], owner: Any, table: ValueTable
) -> None:
    """The owner's series of each family in ``table``, after the owner's ``labels``."""
    ones, manys = table
    for family, one in ones:
        value = one(owner)
        if value is not None:
            rows[family].append((labels, value))
    for family, many in manys:
        for extra, value in many(owner):
            rows[family].append((labels + extra, value))


def target_rows(report: TargetReport, up: bool, render_errors: int) -> dict[str, list[Row]]:
    """The exporter's own series for one target, and for each of its KV event streams."""
    rows: dict[str, list[Row]] = {f.name: [] for f in TARGET_FAMILIES + EVENT_FAMILIES}
    name = report.target.name
    _append(rows, (name,), TargetState(report, up, render_errors), TARGET_VALUES)
    for stream in report.streams:
        _append(rows, (name, str(stream.dp_rank)), StreamState(report, stream), STREAM_VALUES)
    return rows


# ---------------------------------------------------------------------------- writing


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


MAX_CACHED_SERIES = 20_000


class LineWriter:
    """Sample lines as prometheus_client writes them, with each series' prefix cached."""

    def __init__(self) -> None:
        self._prefixes: dict[tuple[str, tuple[str, ...]], str] = {}
        # The last line written for each series, with its value: most values do not change
        # between two polls, and then the line is reused as it is.
        self._lines: dict[tuple[str, tuple[str, ...]], tuple[float, str]] = {}
        self._histograms: dict[tuple[str, tuple[str, ...]], list[str]] = {}

    def prefix(self, name: str, label_names: tuple[str, ...], values: tuple[str, ...]) -> str:
        key = (name, values)
        cached = self._prefixes.get(key)
        if cached is None:
            if label_names:
                pairs = sorted(zip(label_names, values, strict=True))
                inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
                cached = f"{name}{{{inner}}} "
            else:
                cached = f"{name} "
            # A label that UTF-8 cannot encode (a lone surrogate) fails here, for this target.
            cached.encode("utf-8")
            self._prefixes[key] = cached
        return cached

    def lines(self, family: Family, rows: Iterable[Row]) -> str:
        return "".join(
            self.line(family.exposed, family.labels, values, value) for values, value in rows
        )

    def line(
        self, name: str, label_names: tuple[str, ...], values: tuple[str, ...], value: float
    ) -> str:
        key = (name, values)
        last = self._lines.get(key)
        # Equal values write equal text, except 0.0 and -0.0 (equal, written differently).
        if last is not None and last[0] == value and (value or str(last[0]) == str(value)):
            return last[1]
        line = self.prefix(name, label_names, values) + format_value(value) + "\n"
        if len(self._lines) > MAX_CACHED_SERIES:  # series come and go (models, pools): bounded
            self._lines.clear()
            self._prefixes.clear()
            self._histograms.clear()
        self._lines[key] = (value, line)
        return line

    def reuse_histograms(
        self, family: Family, rows: Iterable[tuple[tuple[str, ...], object]]
    ) -> str:
        """Engines' reuse-distance histograms (each row's value a ``ReuseDistances``):
        cumulative buckets, +Inf = count = lookups."""
        out: list[str] = []
        bucket_labels = (*family.labels, "le")
        for labels, hist in rows:
            assert isinstance(hist, ReuseDistances)
            for bound, cumulative in zip(hist.bounds_tokens, hist.cumulative_tokens, strict=True):
                out.append(
                    self.line(
                        f"{family.name}_bucket",
                        bucket_labels,
                        (*labels, format_value(bound)),
                        cumulative,
                    )
                )
            out.append(
                self.line(
                    f"{family.name}_bucket", bucket_labels, (*labels, "+Inf"), hist.query_tokens
                )
            )
            out.append(self.line(f"{family.name}_count", family.labels, labels, hist.query_tokens))
            out.append(
                self.line(f"{family.name}_sum", family.labels, labels, hist.distance_sum_tokens)
            )
        return "".join(out)

    def histogram(self, family: Family, labels: tuple[str, ...], report: TargetReport) -> str:
        """Every bucket of a histogram usually moves on each poll: the lines are written from
        cached prefixes and integer counts, without a lookup per line."""
        durations = report.durations
        key = (family.name, labels)
        prefixes = self._histograms.get(key)
        if prefixes is None:
            bucket_labels = (*family.labels, "le")
            bounds = [*map(str, durations.buckets), "+Inf"]
            prefixes = self._histograms[key] = [
                *(
                    self.prefix(f"{family.name}_bucket", bucket_labels, (*labels, b))
                    for b in bounds
                ),
                self.prefix(f"{family.name}_count", family.labels, labels),
                self.prefix(f"{family.name}_sum", family.labels, labels),
            ]
        out = []
        running = 0
        for prefix, count in zip(prefixes, durations.counts, strict=False):
            running += count
            out.append(f"{prefix}{format_value(running)}\n")
        out.append(f"{prefixes[-2]}{format_value(running)}\n")
        out.append(f"{prefixes[-1]}{format_value(durations.total)}\n")
        return "".join(out)


@dataclass(slots=True)
class TargetLines:
    """One target's rendered lines by family name, and whether its engines made it in."""

    lines: dict[str, str]
    report: TargetReport
    rendered: bool


class TargetRenderer:
    """Renders one target; keeps that target's series prefixes between polls."""

    def __init__(self) -> None:
        self.writer = LineWriter()
        self.render_errors = 0
        # Each family's rows and text from the last render: a family whose rows did not
        # change (capacity, block size, engine info, most counters of a quiet engine) costs
        # one list comparison.
        self._last: dict[str, tuple[list[Row], str]] = {}

    def _text(self, family: Family, rows: list[Row]) -> str:
        last = self._last.get(family.name)
        if last is not None and last[0] == rows:
            return last[1]
        if family.type == "histogram":
            text = self.writer.reuse_histograms(family, rows)
        else:
            text = self.writer.lines(family, rows)
        self._last[family.name] = (rows, text)
        return text

    def render(self, report: TargetReport, polls: int = 1) -> TargetLines:
        """``polls``: how many polls this state stands for (a failed render counts each)."""
        lines: dict[str, str] = {}
        rendered = True
        try:
            merged: dict[str, list[Row]] = {f.name: [] for f in ENGINE_SCOPED}
            for rank, view in sorted(report.engines.items()):
                engine_rows(report.target.name, rank, view, merged)
            for family in ENGINE_SCOPED:
                lines[family.name] = self._text(family, merged[family.name])
        except Exception as exc:  # the parsers refuse such data: this is the last line
            lines = {}
            rendered = False
            first = self.render_errors == 0
            self.render_errors += polls
            if first:
                log.error(
                    "target %s: its series cannot be rendered, left out: %r",
                    report.target.name,
                    exc,
                )
        own = target_rows(report, report.up and rendered, self.render_errors)
        for family in TARGET_FAMILIES + EVENT_FAMILIES:
            if family.type == "histogram":
                lines[family.name] = self.writer.histogram(family, (report.target.name,), report)
            else:
                lines[family.name] = self._text(family, own[family.name])
        return TargetLines(lines, report, rendered)


# ------------------------------------------------------------------- fleet-wide series


def _gpu_joins(
    view: ExporterView, targets: Sequence[TargetLines]
) -> tuple[dict[str, int], dict[str, set[tuple[str, str, str]]]]:
    """Per GPU UUID: the bytes of the KV pools on it (pools on one GPU only), and the engines
    whose pools are on it (the snapshot's UUID, else the config's ``gpus`` map)."""
    pool_bytes_by_uuid: dict[str, int] = {}
    engines_by_uuid: dict[str, set[tuple[str, str, str]]] = {}
    for target in targets:
        if not target.rendered:
            continue
        report = target.report
        mapped = view.gpu_map.get(report.target.name, ())
        for rank, engine_view in sorted(report.engines.items()):
            for pool in engine_view.snapshot.pools:
                uuids = [pool.gpu_uuid] if pool.gpu_uuid else list(mapped)
                for uuid in uuids:
                    engines_by_uuid.setdefault(uuid, set()).add(
                        (report.target.name, str(rank), engine_view.model)
                    )
                    if pool.bytes_per_slot is not None and len(uuids) == 1:
                        pool_bytes_by_uuid[uuid] = pool_bytes_by_uuid.get(uuid, 0) + (
                            pool.bytes_per_slot * pool.capacity_slots
                        )
    return pool_bytes_by_uuid, engines_by_uuid


def gpu_rows(view: ExporterView, targets: Sequence[TargetLines]) -> dict[str, list[Row]]:
    rows: dict[str, list[Row]] = {f.name: [] for f in GPU_FAMILIES}
    pool_bytes_by_uuid, engines_by_uuid = _gpu_joins(view, targets)
    if not view.nvml_enabled:
        # No GPU access in the sidecar: the engines' own UUIDs still join them to another GPU
        # exporter's series (dcgm-exporter's, by UUID); the GPU index is NVML's to know.
        for uuid, engines in sorted(engines_by_uuid.items()):
            for engine_labels in sorted(engines):
                rows["kvcache_gpu_engine_info"].append((("", uuid, *engine_labels), 1))
        return rows
    for gpu in view.gpus:
        labels = (str(gpu.index), gpu.uuid)
        rows["kvcache_gpu_memory_bytes"].append(((*labels, "used"), gpu.memory_used))
        rows["kvcache_gpu_memory_bytes"].append(((*labels, "free"), gpu.memory_free))
        rows["kvcache_gpu_memory_total_bytes"].append((labels, gpu.memory_total))
        if gpu.utilization is not None:
            rows["kvcache_gpu_utilization_ratio"].append((labels, gpu.utilization))
        if gpu.uuid in pool_bytes_by_uuid:
            rows["kvcache_gpu_non_kv_memory_bytes"].append(
                (labels, max(0, gpu.memory_used - pool_bytes_by_uuid[gpu.uuid]))
            )
        for engine_labels in sorted(engines_by_uuid.get(gpu.uuid, ())):
            rows["kvcache_gpu_engine_info"].append(((*labels, *engine_labels), 1))
    return rows


def exporter_rows(view: ExporterView) -> dict[str, list[Row]]:
    rows: dict[str, list[Row]] = {f.name: [] for f in EXPORTER_FAMILIES}
    rows["kvcache_exporter_nvml_up"].append(((), 1 if view.nvml_enabled else 0))
    for (gpu, reason), count in sorted(view.nvml_errors.items()):
        rows["kvcache_exporter_nvml_errors"].append(((gpu, reason), count))
    rows["kvcache_exporter_build_info"].append(((__version__, platform.python_version()), 1))
    if view.reloads is not None:
        reloads = view.reloads
        rows["kvcache_exporter_config_reloads"] += [
            (("success",), reloads.successes),
            (("failure",), reloads.failures),
        ]
        rows["kvcache_exporter_config_last_reload_successful"].append(
            ((), 1 if reloads.last_ok else 0)
        )
        rows["kvcache_exporter_config_last_reload_success_timestamp_seconds"].append(
            ((), reloads.last_success)
        )
    return rows


def render_text(view: ExporterView, targets: Sequence[TargetLines], writer: LineWriter) -> str:
    """Every family in declared order: its header, then each target's lines or fleet rows."""
    fleet = gpu_rows(view, targets) | exporter_rows(view)
    out = []
    for family in ALL:
        out.append(family.header())
        if family.name in fleet:
            out.append(writer.lines(family, fleet[family.name]))
        else:
            out.extend(t.lines.get(family.name, "") for t in targets)
    return "".join(out)


# ------------------------------------------------------------------------- the cache


class Exposition:
    """Per-target lines rendered on the scrape after a change; the joined body and its gzip
    reused until the next change.

    ``update`` is called by the poller after it records a poll (it only files the report);
    ``render``/``render_gzip`` by scrapes. ``view`` gives the fleet-wide part (GPUs, NVML,
    reloads) at scrape time.
    """

    def __init__(self, view: ExporterView | None = None, process_metrics: bool = True) -> None:
        # ``_lock`` guards what the poller touches (pending reports, the generation) and is
        # held only for dict updates, so a scrape rendering never stalls the polling loop;
        # ``_render_lock`` serialises scrapes over the renderers and the cached body.
        self._lock = threading.Lock()
        self._render_lock = threading.RLock()
        self._renderers: dict[str, TargetRenderer] = {}
        self._pending: dict[str, tuple[TargetReport, int]] = {}
        self._targets: dict[str, TargetLines] = {}
        self._order: list[str] = []
        self._fleet_writer = LineWriter()
        self._generation = 0
        self._rendered_generation = -1
        self._body = b""
        self._gzipped: bytes | None = None
        self._process = CollectorRegistry(auto_describe=False)
        if process_metrics:
            ProcessCollector(registry=self._process)
        self.renders = 0
        self.view_source: ExporterViewSource | None = None
        if view is not None:
            fixed = view
            self.view_source = lambda: fixed
            self.set_targets([r.target.name for r in view.targets])
            for report in view.targets:
                self.update(report)

    @property
    def render_errors(self) -> dict[str, int]:
        self._current()  # reports filed since the last scrape count too
        return {name: r.render_errors for name, r in self._renderers.items() if r.render_errors}

    def set_targets(self, names: Sequence[str]) -> None:
        """The configured targets, in order (on start and on reload)."""
        with self._render_lock, self._lock:
            self._order = list(names)
            self._renderers = {n: self._renderers.get(n) or TargetRenderer() for n in names}
            self._targets = {n: t for n, t in self._targets.items() if n in self._renderers}
            self._pending = {n: p for n, p in self._pending.items() if n in self._renderers}
            self._generation += 1

    def update(self, report: TargetReport) -> None:
        """A target's state changed: filed for the next scrape to render."""
        name = report.target.name
        with self._lock:
            if name not in self._renderers:
                return  # removed by a reload while this poll was in flight
            waiting = self._pending.get(name)
            self._pending[name] = (report, 1 if waiting is None else waiting[1] + 1)
            self._generation += 1

    def invalidate(self) -> None:
        """Something fleet-wide changed (GPU readings, NVML errors, a reload)."""
        with self._lock:
            self._generation += 1

    def _current(self) -> tuple[bytes, int]:
        with self._render_lock:
            with self._lock:
                generation = self._generation
                if self._rendered_generation == generation:
                    return self._body, generation
                pending, self._pending = self._pending, {}
                renderers = self._renderers
            for name, (report, polls) in pending.items():
                self._targets[name] = renderers[name].render(report, polls)
            assert self.view_source is not None
            view = self.view_source()
            targets = [self._targets[n] for n in self._order if n in self._targets]
            self._body = render_text(view, targets, self._fleet_writer).encode()
            self._gzipped = None
            self._rendered_generation = generation
            self.renders += 1
            return self._body, generation

    def render(self) -> bytes:
        body, _ = self._current()
        return body + generate_latest(self._process)

    def render_gzip(self) -> bytes:
        """Gzip of the cached part is cached too; process metrics are appended as a gzip member."""
        with self._render_lock:
            body, generation = self._current()
            if self._gzipped is None or generation != self._rendered_generation:
                self._gzipped = gzip.compress(body, compresslevel=1)
            cached = self._gzipped
        # Concatenated gzip members decompress as one stream (RFC 1952).
        return cached + gzip.compress(generate_latest(self._process), compresslevel=1)


class ExporterViewSource(Protocol):
    def __call__(self) -> ExporterView: ...
