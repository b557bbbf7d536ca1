"""Sizes and HOST:PORT as people write them, for every command line and config file.

Pure and torch-free; raises ValueError with a message, which each caller wraps in its own
error (argparse's, or the config's file/key/problem).
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def size_bytes(text: str) -> int:
    """``32MiB``, ``1.5GB``, ``4096`` -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (try 64MiB)")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


def host_port(text: str, default_host: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:80`` too; an empty host is ``default_host``; port 0 = any free)."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit() and len(port) <= 5) or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT with a port in 0-65535 (0: any free), got {text!r}")
    return host.strip("[]") or default_host, int(port)


def format_bytes(value: float) -> str:
    """Bytes as people read them: ``512 MiB``, ``1.4 GiB`` (binary units, three figures)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"
