"""Fuzzing: arbitrary and mutated input raises nothing but the documented parse error.

Bounded example counts (see FUZZ_EXAMPLES) keep CI fast; anything a parser returns must
itself pass the strict snapshot parser (a bridge never builds an invalid snapshot).
"""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from engine_shim.bridges import BridgeError, convert
from exporter.config import parse_config
from exporter.exposition import ExporterView, Exposition
from exporter.sources import PollError, parse_shim_body
from exporter.state import TargetState
from kvstats.kinds import bridge_kinds
from kvstats.snapshot import Snapshot, SnapshotError
from kvstats.validate import parse_snapshot
from tests.builders import valid
from tests.conftest import FIXTURES

FUZZ_EXAMPLES = 400
TARGET = parse_config(
    {"targets": [{"name": "fuzz", "kind": "shim", "url": "http://127.0.0.1:1"}]}
).targets[0]


BRIDGE_TEXT = {  # one real scrape per bridge kind (tests/kvstats/test_kinds.py checks the set)
    "vllm": (FIXTURES / "vllm-0.33.0-dp1.prom").read_text(),
    "sglang": (FIXTURES / "sglang-0.5.23-hicache.prom").read_text(),
}
SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Full Unicode, lone surrogates included (legal in JSON text, impossible in UTF-8), and integers
# far beyond 2^64 and float range (a JSON parser takes them; no metric sample can hold them).
any_text = st.text(st.characters(exclude_categories=()), max_size=20)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-(10**400), 10**400)
    | st.sampled_from([2**53, 2**53 + 1, 2**64, 10**309, -(10**309)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)


def paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += paths(v, (*prefix, i))
    return out


@SETTINGS
@given(json_values)
def test_snapshot_parser_on_arbitrary_json(data: Any) -> None:
    with contextlib.suppress(SnapshotError):
        parse_snapshot(data)


@SETTINGS
@given(st.data())
def test_snapshot_parser_on_mutated_snapshots(data: st.DataObject) -> None:
    snapshot = valid()
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(paths(snapshot)[1:]))
        parent: Any = snapshot
        for key in where[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            del parent[where[-1]]
        else:
            parent[where[-1]] = data.draw(json_values)
    try:
        parsed = parse_snapshot(copy.deepcopy(snapshot))
    except SnapshotError:
        return
    for pool in parsed.pools:  # whatever passes keeps the schema's promises
        if pool.evictable_slots is not None and pool.available_slots is not None:
            assert (
                pool.used_slots + pool.evictable_slots + pool.available_slots == pool.capacity_slots
            )
    assert_renders(parsed)


def assert_renders(snapshot: Snapshot) -> None:
    """Whatever the parser accepts, the exporter derives and renders as valid text with that
    target up (the renderer's last line of defence never has to drop it)."""
    state = TargetState(TARGET, eta_window=60)
    state.record_success([snapshot], now=1e9, duration=0.01)
    exposition = Exposition(ExporterView([state.report()], [], {}, False, {}), False)
    text = exposition.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert exposition.render_errors == {}
    assert [s.value for s in families["kvcache_exporter_target_up"].samples] == [1.0]


@SETTINGS
@given(st.binary(max_size=2000) | json_values.map(lambda v: json.dumps(v).encode()))
@example(b"[" * 100_000 + b"]" * 100_000)  # nested past the recursion limit
@example(b'{"schema": ' + b"9" * 5000 + b"}")  # past Python's int-from-text limit
@example(b'{"schema": "\\ud800"}')
def test_shim_body_parser_on_arbitrary_bytes(raw: bytes) -> None:
    try:
        parse_shim_body(raw)
    except PollError as exc:
        assert exc.reason in ("invalid_body", "invalid_snapshot")


@SETTINGS
@given(
    kind=st.sampled_from(bridge_kinds()),
    text=st.text(st.characters(exclude_categories=()), max_size=3000),
)
def test_bridges_on_arbitrary_text(kind: str, text: str) -> None:
    try:
        result = convert(kind, text)
    except BridgeError:
        return
    for snap in result.snapshots:
        assert_renders(parse_snapshot(snap.to_json()))
        assert_renders(snap)


def mutate_line(lines: list[str], i: int, op: str, data: st.DataObject) -> list[str]:
    """One mutation of an engine's exposition text at line ``i``."""
    if op == "drop":
        del lines[i]
    elif op == "dup":
        lines.insert(i, lines[i])
    elif op == "value" and not lines[i].startswith("#") and " " in lines[i]:
        number = data.draw(
            st.sampled_from(["NaN", "-1", "+Inf", "-Inf", "1e308", "0", "abc", "-0.5"])
        )
        lines[i] = lines[i].rsplit(" ", 1)[0] + " " + number
    elif op == "flip" and lines[i]:
        j = data.draw(st.integers(0, len(lines[i]) - 1))
        lines[i] = lines[i][:j] + data.draw(st.characters()) + lines[i][j + 1 :]
    elif op == "truncate":
        lines = lines[: i + 1]
        lines[-1] = lines[-1][: data.draw(st.integers(0, len(lines[-1])))]
    elif op == "label" and "{" in lines[i]:
        lines[i] = lines[i].replace("{", '{engine="7",dp_rank="3",tp_rank="1",', 1)
    return lines


@SETTINGS
@given(kind=st.sampled_from(bridge_kinds()), data=st.data())
def test_bridges_on_mutated_engine_text(kind: str, data: st.DataObject) -> None:
    lines = BRIDGE_TEXT[kind].splitlines()
    for _ in range(data.draw(st.integers(1, 6))):
        if not lines:
            break
        i = data.draw(st.integers(0, len(lines) - 1))
        op = data.draw(st.sampled_from(["drop", "dup", "value", "flip", "truncate", "label"]))
        lines = mutate_line(lines, i, op, data)
    try:
        result = convert(kind, "\n".join(lines) + "\n")
    except BridgeError:
        return
    for snap in result.snapshots:
        assert_renders(parse_snapshot(snap.to_json()))


# Values that broke rendering for every target once: a lone surrogate in any string, an integer
# past 2^53 or past float range in any number. Every field of a valid snapshot gets one.
hostile = (
    st.text(
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3
    ).flatmap(lambda s: st.sampled_from([s, f"v{s}", f"{s}x"]))
    | st.integers(2**53 + 1, 10**400)
    | st.sampled_from([2**53 + 1, 2**64, 10**308 * 10, 10**400, 1e300, -(10**400)])
)


@SETTINGS
@given(where=st.sampled_from(paths(valid())[1:]), value=hostile, also_group=st.booleans())
def test_hostile_values_in_any_field_are_refused_or_cleaned(
    where: tuple[Any, ...], value: Any, also_group: bool
) -> None:
    snapshot = valid()
    parent: Any = snapshot
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    if also_group and where == ("pools", 0, "name"):
        snapshot["groups"][0]["pool"] = value  # keep the group pointing at the renamed pool
    try:
        parsed = parse_snapshot(snapshot)
    except SnapshotError:
        return
    assert_renders(parsed)
