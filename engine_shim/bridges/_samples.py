"""Parsing and sample lookup shared by the bridges."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from kvstats.snapshot import MAX_COUNT, Snapshot

MAX_TEXT_BYTES = 16 << 20


class BridgeError(ValueError):
    """The text cannot be turned into any truthful snapshot."""


@dataclass(frozen=True, slots=True)
class BridgeResult:
    snapshots: list[Snapshot]
    # What the text did not tell, e.g. "engine 0: evictable tokens (vLLM does not export them)".
    missing: list[str] = field(default_factory=list)


Labels = dict[str, str]
LabelFilter = Callable[[Labels], bool]


@dataclass(frozen=True, slots=True)
class Sample:
    labels: Labels
    value: float


_SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum", "_info", "_gsum", "_gcount")


def family_of(name: str) -> str:
    """``vllm:num_preemptions_total`` -> ``vllm:num_preemptions`` (a sample's family)."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def select_families(text: str, families: frozenset[str]) -> str:
    """Only the lines of ``families`` (comments and samples): what a bridge reads is all that
    the parser then parses, so a scrape's cost no longer grows with the histograms an engine
    exports. A line is kept by its metric name, exactly or as a family plus a standard suffix."""
    kept = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            name = parts[2] if len(parts) > 2 and parts[1] in ("HELP", "TYPE") else ""
        else:
            end = len(line)
            for stop in ("{", " ", "\t"):
                at = line.find(stop)
                if 0 <= at < end:
                    end = at
            name = line[:end]
        if name in families or family_of(name) in families:
            kept.append(line)
    return "\n".join(kept) + "\n" if kept else ""


class Samples:
    """Samples by sample name (``vllm:num_preemptions_total``), with duplicates refused.

    With ``families``, only those families' lines are parsed (``select_families``)."""

    def __init__(self, text: str, families: frozenset[str] | None = None) -> None:
        if len(text) > MAX_TEXT_BYTES:
            raise BridgeError(f"metrics text of {len(text)} bytes exceeds {MAX_TEXT_BYTES}")
        if not text.strip():
            raise BridgeError("no metrics in the text")
        if families is not None:
            text = select_families(text, families)
        self.by_name: dict[str, list[Sample]] = {}
        seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        try:
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    if key in seen:
                        raise BridgeError(f"duplicate series {s.name}{dict(key[1])}")
                    seen.add(key)
                    self.by_name.setdefault(s.name, []).append(
                        Sample(dict(s.labels), float(s.value))
                    )
        except BridgeError:
            raise
        except Exception as exc:  # the parser raises ValueError, IndexError, ... on bad text
            raise BridgeError(f"malformed metrics text: {type(exc).__name__}: {exc}") from None
        if not self.by_name and families is None:
            raise BridgeError("no metrics in the text")

    def all(self, name: str, where: LabelFilter | None = None) -> list[Sample]:
        return [s for s in self.by_name.get(name, []) if where is None or where(s.labels)]

    def one(self, name: str, where: LabelFilter | None = None) -> float | None:
        """The value of the single matching sample; None if absent or not a finite number."""
        found = self.all(name, where)
        if not found:
            return None
        if len(found) > 1:
            labels = [s.labels for s in found]
            raise BridgeError(f"{name}: expected one series, got {len(found)}: {labels}")
        value = found[0].value
        return value if math.isfinite(value) else None

    def total(self, name: str, where: LabelFilter | None = None) -> float | None:
        """Sum over matching samples (counters split by ``pid`` in multiprocess mode)."""
        found = [s.value for s in self.all(name, where)]
        if not found or not all(math.isfinite(v) for v in found):
            return None
        return sum(found)

    def label_values(self, name: str, label: str) -> list[str]:
        return sorted({s.labels[label] for s in self.all(name) if label in s.labels})


def as_count(value: float | None) -> int | None:
    """Prometheus floats -> token counts; negative, non-finite or past-2^53 values are unknown."""
    if value is None or not math.isfinite(value) or value < 0 or value > MAX_COUNT:
        return None
    return round(value)


def first_present(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def labels_match(**wanted: str) -> LabelFilter:
    return lambda labels: all(labels.get(k) == v for k, v in wanted.items())


def is_number(text: str | None) -> bool:
    """ASCII digits of a sane length: what ``int()`` takes cheaply and exactly. (``str.isdigit``
    is true for "²", which ``int`` refuses, and for 5,000 digits, which it refuses too.)"""
    return text is not None and 0 < len(text) <= 18 and text.isascii() and text.isdigit()


def rank_order(value: str) -> tuple[bool, int, str]:
    """Sort key for rank labels: numerically ("2" before "10"), anything else after."""
    return (not is_number(value), int(value) if is_number(value) else 0, value)


def pick_lowest(values: Iterable[str]) -> str | None:
    """The lowest rank label present ("0" normally)."""
    return min(values, key=rank_order, default=None)


def per_rank(
    ranks: Iterable[str], build: Callable[[str, list[str]], Snapshot | None], what: str
) -> BridgeResult:
    """One snapshot per rank (in rank order); ranks that cannot be read say why in ``missing``.

    Raises BridgeError only when no rank at all could be read."""
    missing: list[str] = []
    snapshots = [
        s for rank in sorted(set(ranks), key=rank_order) if (s := build(rank, missing)) is not None
    ]
    if not snapshots:
        raise BridgeError(f"no {what} could be read: " + "; ".join(missing))
    return BridgeResult(snapshots, missing)
