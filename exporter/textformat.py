"""Numbers as the text format writes them: prometheus_client's own ``floatToGoString`` (Go's
formatting, as Prometheus expects), with the common case done directly."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from prometheus_client.utils import floatToGoString as _untyped_float_to_go_string

floatToGoString = cast(Callable[[float], str], _untyped_float_to_go_string)


def format_value(value: float) -> str:
    """``floatToGoString``, with the common case (a small integer: counts, slots) done directly;
    ``tests/exporter/test_exposition.py`` proves the two equal. Go's format switches to an
    exponent at 10^6 for positive numbers, so only integers below that take the shortcut."""
    if type(value) is int and -(10**15) < value < 1_000_000:
        return f"{value}.0"
    return floatToGoString(value)
