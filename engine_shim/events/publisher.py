"""KV events on vLLM's wire protocol, for engines of our own (the reference engine).

What vLLM's ``ZmqEventPublisher`` does, so every consumer of vLLM's events (ours, llm-d's
indexer, Dynamo's router) reads this engine too: a PUB socket sends ``(topic, seq as 8 bytes
big-endian, msgpack [ts, events, dp_rank])``, events as tagged maps; a ROUTER socket answers
``(b"", start seq)`` with ``(b"", topic, seq, payload)`` for every buffered batch from there,
then ``(b"", b"", END_SEQ, b"")``. Sockets are served by one thread; the engine only queues
batches, and a full queue drops a batch (a gap the subscriber sees) rather than block the
engine: monitoring never slows serving.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Any

import msgspec
import zmq

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def block_stored(
    hashes: list[bytes], parent: bytes | None, token_ids: list[int], block_size: int
) -> dict[str, Any]:
    """vLLM's ``BlockStored`` (device tier), as a tagged map."""
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": token_ids,
        "block_size": block_size,
        "lora_id": None,
        "medium": "GPU",
    }


def block_removed(hashes: list[bytes]) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}


class EventPublisher:
    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        dp_rank: int = 0,
        buffer_steps: int = 10_000,
        max_queue: int = 100_000,
    ) -> None:
        self.topic = topic.encode()
        self.dp_rank = dp_rank
        self.dropped = 0  # batches the engine produced faster than they could be sent
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replay: zmq.Socket[bytes] | None = None
        self.replay_endpoint: str | None = None
        if replay_endpoint is not None:
            self._replay = self._context.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._queue: queue.Queue[list[dict[str, Any]] | None] = queue.Queue(max_queue)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._encoder = msgspec.msgpack.Encoder()
        self._seq = 0
        self._thread = threading.Thread(target=self._serve, name="kv-events", daemon=True)
        self._thread.start()

    def publish(self, events: list[dict[str, Any]]) -> None:
        """Queue one batch (one engine step's events); never blocks."""
        try:
            self._queue.put_nowait(events)
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
        self._context.destroy(linger=0)

    def _serve(self) -> None:
        while True:
            if self._replay is not None and self._replay.poll(0):
                self._answer_replay()
            try:
                events = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if events is None:
                return
            payload = self._encoder.encode([time.time(), events, self.dp_rank])
            seq = self._seq.to_bytes(8, "big")
            self._pub.send_multipart([self.topic, seq, payload])
            self._buffer.append((self._seq, payload))
            self._seq += 1

    def _answer_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("KV events: a replay request of %d frames, ignored", len(frames))
            return
        client, start = frames[0], int.from_bytes(frames[2], "big")
        for seq, payload in self._buffer:
            if seq >= start:
                self._replay.send_multipart(
                    [client, b"", self.topic, seq.to_bytes(8, "big"), payload]
                )
        self._replay.send_multipart([client, b"", b"", END_SEQ, b""])
