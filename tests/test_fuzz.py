"""Fuzzing: arbitrary and mutated input raises nothing but the documented parse error.

Bounded example counts (see FUZZ_EXAMPLES) keep CI fast; anything a parser returns must
itself pass the strict snapshot parser (a bridge never builds an invalid snapshot).
"""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_shim.bridges import BridgeError, convert
from engine_shim.snapshot import SnapshotError, parse_snapshot
from exporter.sources import PollError, parse_shim_body
from tests.conftest import FIXTURES
from tests.test_snapshot import valid

FUZZ_EXAMPLES = 400
FIXTURE_TEXT = {
    "vllm": (FIXTURES / "vllm-0.33.0-dp1.prom").read_text(),
    "sglang": (FIXTURES / "sglang-0.5.23-hicache.prom").read_text(),
}
SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
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


@SETTINGS
@given(st.binary(max_size=2000) | json_values.map(lambda v: json.dumps(v).encode()))
def test_shim_body_parser_on_arbitrary_bytes(raw: bytes) -> None:
    try:
        parse_shim_body(raw)
    except PollError as exc:
        assert exc.reason in ("invalid_body", "invalid_snapshot")


@SETTINGS
@given(kind=st.sampled_from(["vllm", "sglang"]), text=st.text(max_size=3000))
def test_bridges_on_arbitrary_text(kind: str, text: str) -> None:
    try:
        result = convert(kind, text)
    except BridgeError:
        return
    for snap in result.snapshots:
        parse_snapshot(snap.to_json())


@SETTINGS
@given(kind=st.sampled_from(["vllm", "sglang"]), data=st.data())
def test_bridges_on_mutated_engine_text(kind: str, data: st.DataObject) -> None:
    lines = FIXTURE_TEXT[kind].splitlines()
    for _ in range(data.draw(st.integers(1, 6))):
        if not lines:
            break
        i = data.draw(st.integers(0, len(lines) - 1))
        op = data.draw(st.sampled_from(["drop", "dup", "value", "flip", "truncate", "label"]))
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
    try:
        result = convert(kind, "\n".join(lines) + "\n")
    except BridgeError:
        return
    for snap in result.snapshots:
        parse_snapshot(snap.to_json())
