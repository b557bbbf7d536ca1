"""The incremental exposition against the library and against the exposition it replaced.

- golden: a deterministic fleet (every family with samples) renders exactly, byte for byte,
  what the previous renderer (prometheus_client families + ``generate_latest``) wrote for it
  (``testdata/exposition/fleet.golden.prom``, made before the switch);
- library: for any label values and numbers, a line equals the one ``generate_latest`` writes;
- incremental: after any sequence of target updates, the body equals a fresh full render;
- promtool: ``promtool check metrics`` finds nothing;
- families: declared once, and the metric table (docs/exporter.md) lists exactly them.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from exporter.exposition import Exposition, LineWriter
from exporter.families import ALL, BY_NAME, Family, series_estimate
from exporter.textformat import format_value
from tests.exposition_fixture import GPU_UUID, fleet_states, fleet_view

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parents[1] / "testdata" / "exposition" / "fleet.golden.prom"


def parsed(text: str) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    return [
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for f in text_string_to_metric_families(text)
        for s in f.samples
    ]


def test_the_fleet_renders_exactly_as_before() -> None:
    """A new family's lines join the golden file with ``KVCACHE_REGENERATE_GOLDEN=1`` (then
    review the diff: only the new lines may change; the library test checks their format)."""
    body = Exposition(fleet_view(), process_metrics=False).render().decode()
    if os.environ.get("KVCACHE_REGENERATE_GOLDEN") == "1":
        GOLDEN.write_text(body)
    golden = GOLDEN.read_text()
    assert parsed(body) == parsed(golden)  # sample for sample, in order
    assert body == golden  # and byte for byte


def test_gzip_is_the_same_body() -> None:
    exposition = Exposition(fleet_view(), process_metrics=False)
    assert gzip.decompress(exposition.render_gzip()) == exposition.render()


def test_promtool_finds_nothing() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/test installs Debian's prometheus"
    body = Exposition(fleet_view()).render()
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert result.returncode == 0 and not result.stdout + result.stderr, result


label_values = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**60), 2**60)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.tuples(label_values, label_values, numbers), min_size=1, max_size=5))
def test_a_line_is_what_prometheus_client_writes(
    values: list[tuple[str, str, float]],
) -> None:
    family = Family("kvcache_fuzz", "gauge", "a \\ help\nline", ("zeta", "alpha"))
    reference = GaugeMetricFamily(family.name, family.help, labels=list(family.labels))
    for zeta, alpha, value in values:
        reference.add_metric([zeta, alpha], value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(type("C", (), {"collect": lambda self: [reference]})())
    ours = family.header() + LineWriter().lines(family, [((z, a), v) for z, a, v in values])
    assert ours == generate_latest(registry).decode()


@settings(max_examples=2000, deadline=None)
@given(
    value=st.integers(-(2**70), 2**70)
    | st.integers(-2_000_000, 2_000_000)
    | st.sampled_from([0, -1, 999_999, 1_000_000, -(10**15), -(10**15) + 1, 10**15])
    | st.floats(allow_nan=True, allow_infinity=True)
)
def test_the_value_shortcut_writes_what_prometheus_client_does(value: float) -> None:
    assert format_value(value) == floatToGoString(value)


def test_polls_between_two_scrapes_are_rendered_once() -> None:
    states = fleet_states(copies=1)
    exposition = Exposition(fleet_view(states), process_metrics=False)
    first = exposition.render()
    renders = exposition.renders
    assert exposition.render() == first and exposition.renders == renders  # nothing changed
    for _ in range(5):  # five polls between two scrapes
        for state in states:
            if state.up:
                snapshots = [view.snapshot for view in state.engines.values()]
                state.record_success(snapshots, now=2e9, duration=0.01)
            else:
                state.record_failure("timeout", 0.5)
            exposition.update(state.report())
    text = exposition.render().decode()
    assert exposition.renders == renders + 1
    assert text == Exposition(fleet_view(states), process_metrics=False).render().decode()


def test_updates_render_what_a_full_render_does() -> None:
    states = fleet_states(copies=3)
    view = fleet_view(states)
    incremental = Exposition(view, process_metrics=False)
    for step in range(3):  # polls change targets one at a time, in any order
        for state in reversed(states):
            if step == 1:
                state.record_failure("timeout", 0.5)
            incremental.update(state.report())
        fresh = Exposition(fleet_view(states), process_metrics=False)
        assert incremental.render() == fresh.render()


def test_without_nvml_engines_still_name_their_gpus() -> None:
    """For dcgm-exporter's join (by UUID): the engines' own UUIDs, or the config's gpus map for
    engines that report none; the GPU index is NVML's to know, so it is empty."""
    states = fleet_states()
    view = dataclasses.replace(fleet_view(states), nvml_enabled=False, gpu_map={"vllm": ("GPU-v",)})
    text = Exposition(view, process_metrics=False).render().decode()
    info = {
        (s.labels["gpu"], s.labels["uuid"], s.labels["engine"])
        for f in text_string_to_metric_families(text)
        if f.name == "kvcache_gpu_engine_info"
        for s in f.samples
    }
    assert info == {("", GPU_UUID, "ref"), ("", "GPU-v", "vllm")}
    assert "kvcache_gpu_memory_bytes{" not in text  # no NVML readings without NVML


def test_families_are_declared_once_and_the_readme_lists_them() -> None:
    assert len({f.exposed for f in ALL}) == len(ALL) == len(BY_NAME)
    doc = (ROOT / "docs" / "exporter.md").read_text()
    table = doc[doc.index("### Metrics") : doc.index("**Slots and tokens")]
    listed = set(re.findall(r"`(kvcache_[a-z0-9_]+)`", table))
    assert listed == {f.exposed for f in ALL}


def test_series_estimate_bounds_the_fleet() -> None:
    for state in fleet_states():
        report = state.report()
        one = Exposition(fleet_view([state]), process_metrics=False).render().decode()
        series = [n for n in re.findall(r"^(kvcache_[a-z0-9_]+)", one, re.M)]
        target_series = [
            n
            for n in series
            if not n.startswith(
                (
                    "kvcache_gpu_",
                    "kvcache_exporter_nvml",
                    "kvcache_exporter_build",
                    "kvcache_exporter_config",
                )
            )
        ]
        snaps = [v.snapshot for v in report.engines.values()]
        reuse = [len(s.reuse_distance.bounds_tokens) for s in snaps if s.reuse_distance]
        estimate = series_estimate([len(s.pools) for s in snaps], reuse)
        assert len(target_series) <= estimate
        if reuse:  # the histogram is counted, not left to the slack of other families
            assert len(target_series) > series_estimate([len(s.pools) for s in snaps])


@settings(max_examples=100, deadline=None)
@given(
    bounds=st.lists(st.integers(1, 2**40), min_size=1, max_size=64, unique=True).map(sorted),
    data=st.data(),
)
def test_a_reuse_histogram_is_what_prometheus_client_writes(
    bounds: list[int], data: st.DataObject
) -> None:
    """The golden file gained this family with the reuse-distance section: its lines are
    checked here against the library's own histogram family, for any bounds and counts."""
    from prometheus_client.core import HistogramMetricFamily

    from exporter.families import BY_NAME as FAMILIES
    from kvstats.snapshot import ReuseDistances

    steps = data.draw(st.lists(st.integers(0, 2**30), min_size=len(bounds), max_size=len(bounds)))
    cumulative = [sum(steps[: i + 1]) for i in range(len(bounds))]
    queries = cumulative[-1] + data.draw(st.integers(0, 2**30))
    hist = ReuseDistances(
        0.5, tuple(bounds), tuple(cumulative), queries, data.draw(st.integers(0, 2**50))
    )
    family = FAMILIES["kvcache_prefix_reuse_distance_tokens"]
    reference = HistogramMetricFamily(family.name, family.help, labels=list(family.labels))
    reference.add_metric(
        ["ref", "0", "m"],
        [
            *((floatToGoString(b), c) for b, c in zip(bounds, cumulative, strict=True)),
            ("+Inf", queries),
        ],
        sum_value=hist.distance_sum_tokens,
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(type("C", (), {"collect": lambda self: [reference]})())
    ours = family.header() + LineWriter().reuse_histograms(family, [(("ref", "0", "m"), hist)])
    assert ours == generate_latest(registry).decode()


def family_series(table: Any, owner: Any) -> dict[str, list[tuple[tuple[str, ...], Any]]]:
    """Each family's series for ``owner`` from a value table (``exposition.ValueTable``)."""
    ones, manys = table
    out: dict[str, list[tuple[tuple[str, ...], Any]]] = {}
    for name, one in ones:
        value = one(owner)
        out[name] = [] if value is None else [((), value)]
    for name, many in manys:
        out[name] = many(owner)
    return out


def owners_of(view: Any) -> list[tuple[Any, Any, int]]:
    """An engine's owners of series: each pool as polled, and as a KV event stream bounds it
    (bridges without a shim), then the engine; with their value table and label count."""
    from exporter.exposition import ENGINE_VALUES, POOL_VALUES
    from exporter.families import ENGINE, POOL, PoolState

    owners: list[tuple[Any, Any, int]] = []
    for pool in view.snapshot.pools:
        bounded = dataclasses.replace(pool, evictable_slots_lower=1, evictable_slots_upper=2)
        for variant in (pool, bounded):
            owners.append((PoolState(variant, view.ratios[pool.name]), POOL_VALUES, len(POOL)))
    owners.append((view, ENGINE_VALUES, len(ENGINE)))
    return owners


def test_each_engine_family_reads_its_own_values_within_its_declared_fanout() -> None:
    """Families declare their value functions beside them: over the fixture fleet (every family
    has samples), each engine family gives series of its own label arity, never more per owner
    than its fan-out (what the series estimate counts), and every family shows up; engine_rows
    labels them with the engine and the pool."""
    from exporter.derive import COUNTER_FIELDS
    from exporter.exposition import engine_rows
    from exporter.families import BY_NAME, ENGINE_SCOPED

    seen: set[str] = set()
    for target in fleet_view().targets:
        for rank, view in target.engines.items():
            for owner, table, own_labels in owners_of(view):
                for name, rows in family_series(table, owner).items():
                    assert len(rows) <= BY_NAME[name].fanout, name
                    assert all(own_labels + len(x) == len(BY_NAME[name].labels) for x, _ in rows)
                    seen |= {name} if rows else set()
            labelled: dict[str, list[Any]] = {f.name: [] for f in ENGINE_SCOPED}
            engine_rows(target.target.name, rank, view, labelled)
            for name, rows in labelled.items():
                assert all(len(labels) == len(BY_NAME[name].labels) for labels, _ in rows), name
    assert seen == {f.name for f in ENGINE_SCOPED}
    # A counter the snapshot gains is published only once it has a family reading it.
    assert {f"kvcache_{name}" for name in COUNTER_FIELDS} <= seen


def test_each_target_and_stream_family_reads_its_own_values_within_its_fanout() -> None:
    """The exporter's per-target and per-stream families, the same way: of their declared label
    arity, within their fan-out, every one seen on the fixture fleet (the poll-duration
    histogram is written from the report itself)."""
    from exporter.exposition import STREAM_VALUES, TARGET_VALUES
    from exporter.families import (
        BY_NAME,
        EVENT_FAMILIES,
        STREAM,
        TARGET,
        TARGET_FAMILIES,
        StreamState,
        TargetState,
    )

    seen: set[str] = set()
    for report in fleet_view().targets:
        owners: list[tuple[Any, Any, int]] = [(TargetState(report, True, 0), TARGET_VALUES, 1)]
        owners += [(StreamState(report, s), STREAM_VALUES, len(STREAM)) for s in report.streams]
        for owner, table, own_labels in owners:
            for name, rows in family_series(table, owner).items():
                assert len(rows) <= BY_NAME[name].fanout, name
                assert all(own_labels + len(x) == len(BY_NAME[name].labels) for x, _ in rows)
                seen |= {name} if rows else set()
    assert len(TARGET) == 1
    declared = {f.name for f in TARGET_FAMILIES + EVENT_FAMILIES if f.type != "histogram"}
    assert seen == declared
