"""One KV event batch, as vLLM and SGLang publish it, into typed events.

The wire (both engines): ZMQ multipart ``(topic, seq as 8 bytes big-endian, payload)``, the
payload a msgpack ``EventBatch`` array ``[ts, events, dp_rank]``. Each event is either a
*tagged map* (``{"type": "BlockStored", "block_hashes": ..., ...}``: vLLM since PR 42892,
SGLang) or a *positional array* (``["BlockStored", block_hashes, parent_block_hash,
token_ids, block_size, lora_id, medium, lora_name, extra_keys, group_idx, ...]``: older
vLLM), its fields in the order the engine's struct declares them. Only the fields residency
needs are decoded; the rest (token ids, extra keys) are skipped without building objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

# Media as the engines name them -> the tier the exporter publishes. vLLM: GPU, CPU (its
# offloading connectors), STORAGE; SGLang's HiCache: GPU, CPU_PINNED, DISK, EXTERNAL. An
# event without a medium is the device pool's (engines that predate the field).
TIER_OF_MEDIUM = {
    None: "device",
    "GPU": "device",
    "CPU": "host",
    "CPU_PINNED": "host",
    "STORAGE": "storage",
    "DISK": "storage",
    "EXTERNAL": "external",
}
RESIDENT_TIERS: tuple[str, ...] = ("device", "host", "storage", "external")
_MASK64 = (1 << 64) - 1
MAX_EVENTS_PER_BATCH = 1_000_000


class EventDecodeError(ValueError):
    """A payload that is not an event batch; ``reason`` is the counted reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Stored:
    fingerprints: list[int]  # 64-bit, one per block
    tier: str | None  # None: a medium this decoder does not know (the event is not counted)
    group: int
    block_size: int


@dataclass(frozen=True, slots=True)
class Removed:
    fingerprints: list[int]
    tier: str | None
    group: int


@dataclass(frozen=True, slots=True)
class Cleared:
    pass


@dataclass(frozen=True, slots=True)
class Unknown:
    """An event type this decoder does not know (a newer engine): skipped, and counted."""

    type: str


Event = Stored | Removed | Cleared | Unknown


@dataclass(frozen=True, slots=True)
class Batch:
    ts: float
    events: list[Event]
    dp_rank: int | None


Hash = int | bytes


class _MapStored(msgspec.Struct, tag="BlockStored", tag_field="type"):
    block_hashes: list[Hash]
    block_size: int = 0
    medium: str | None = None
    group_idx: int | None = None


class _MapRemoved(msgspec.Struct, tag="BlockRemoved", tag_field="type"):
    block_hashes: list[Hash]
    medium: str | None = None
    group_idx: int | None = None


class _MapCleared(msgspec.Struct, tag="AllBlocksCleared", tag_field="type"):
    pass


class _ArrayStored(msgspec.Struct, array_like=True, tag="BlockStored"):
    block_hashes: list[Hash]
    parent_block_hash: msgspec.Raw = msgspec.Raw()
    token_ids: msgspec.Raw = msgspec.Raw()
    block_size: int = 0
    lora_id: msgspec.Raw = msgspec.Raw()
    medium: str | None = None
    lora_name: msgspec.Raw = msgspec.Raw()
    extra_keys: msgspec.Raw = msgspec.Raw()
    group_idx: int | None = None


class _ArrayRemoved(msgspec.Struct, array_like=True, tag="BlockRemoved"):
    block_hashes: list[Hash]
    medium: str | None = None
    group_idx: int | None = None


class _ArrayCleared(msgspec.Struct, array_like=True, tag="AllBlocksCleared"):
    pass


class _Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    dp_rank: int | None = None


class _MapBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[_MapStored | _MapRemoved | _MapCleared]
    dp_rank: int | None = None


class _ArrayBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[_ArrayStored | _ArrayRemoved | _ArrayCleared]
    dp_rank: int | None = None


_batch = msgspec.msgpack.Decoder(_Batch)
# The common case in one C-level pass: every event known, one encoding. Anything else (an
# unknown event type, a mixed or broken batch) takes the event-by-event path.
_whole_batch = (msgspec.msgpack.Decoder(_MapBatch), msgspec.msgpack.Decoder(_ArrayBatch))
_map_event = msgspec.msgpack.Decoder(_MapStored | _MapRemoved | _MapCleared)
_array_event = msgspec.msgpack.Decoder(_ArrayStored | _ArrayRemoved | _ArrayCleared)
_any = msgspec.msgpack.Decoder()


def fingerprint(block_hash: Hash) -> int:
    """A block hash as 64 bits: an integer hash (vLLM's default, SGLang's signed int64) as
    is, modulo 2^64; a bytes hash (vLLM's sha256 hashes) by its first 8 bytes."""
    if type(block_hash) is int:
        return block_hash & _MASK64
    return int.from_bytes(bytes(block_hash)[:8], "big")


def _fingerprints(hashes: list[Hash]) -> list[int]:
    return [h & _MASK64 if type(h) is int else fingerprint(h) for h in hashes]


def _event(raw: msgspec.Raw) -> Event:
    head = memoryview(raw)[0] if len(raw) else 0
    # msgpack: fixarray 0x90-0x9f, array16/32 0xdc/0xdd; everything else a map is tried as.
    array = 0x90 <= head <= 0x9F or head in (0xDC, 0xDD)
    try:
        decoded = (_array_event if array else _map_event).decode(raw)
    except msgspec.ValidationError:
        kind = _event_type(raw, array)
        if kind is not None and kind not in ("BlockStored", "BlockRemoved", "AllBlocksCleared"):
            return Unknown(kind[:64])
        raise
    return _typed(decoded)


def _typed(
    decoded: _MapStored | _MapRemoved | _MapCleared | _ArrayStored | _ArrayRemoved | _ArrayCleared,
) -> Event:
    if isinstance(decoded, _MapStored | _ArrayStored):
        return Stored(
            _fingerprints(decoded.block_hashes),
            TIER_OF_MEDIUM.get(decoded.medium),
            decoded.group_idx or 0,
            decoded.block_size,
        )
    if isinstance(decoded, _MapRemoved | _ArrayRemoved):
        return Removed(
            _fingerprints(decoded.block_hashes),
            TIER_OF_MEDIUM.get(decoded.medium),
            decoded.group_idx or 0,
        )
    return Cleared()


def _event_type(raw: msgspec.Raw, array: bool) -> str | None:
    """The tag of an event the typed decoders refused, if it has a readable one."""
    try:
        value = _any.decode(raw)
    except msgspec.DecodeError:
        return None
    tag = value[0] if array and value else value.get("type") if isinstance(value, dict) else None
    return tag if isinstance(tag, str) else None


def decode_batch(payload: bytes) -> Batch:
    """The events of one payload, or ``EventDecodeError`` (reason ``invalid_batch``: not an
    event batch at all; ``invalid_event``: a known event type with fields that do not fit)."""
    for decoder in _whole_batch:
        try:
            whole = decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if len(whole.events) <= MAX_EVENTS_PER_BATCH:
            return Batch(whole.ts, [_typed(e) for e in whole.events], whole.dp_rank)
    return decode_batch_by_event(payload)


def decode_batch_by_event(payload: bytes) -> Batch:
    """``decode_batch`` one event at a time: what it falls back on, and what the tests hold
    its one-pass fast path equal to."""
    try:
        batch = _batch.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EventDecodeError("invalid_batch", f"not an event batch: {exc}") from None
    if len(batch.events) > MAX_EVENTS_PER_BATCH:
        raise EventDecodeError("invalid_batch", f"{len(batch.events)} events in one batch")
    try:
        events = [_event(raw) for raw in batch.events]
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EventDecodeError("invalid_event", f"an event that does not fit: {exc}") from None
    return Batch(batch.ts, events, batch.dp_rank)
