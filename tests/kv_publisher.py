"""A KV event publisher speaking vLLM's wire protocol (``ZmqEventPublisher``): PUB frames
``(topic, seq as 8 bytes big-endian, payload)`` and a ROUTER replay socket that answers
``(b"", start seq)`` with ``(b"", topic, seq, payload)`` for every buffered batch from there,
then ``(b"", b"", END_SEQ, b"")`` (vLLM 0.31-0.34, SGLang; ``legacy_replay``: without the topic,
as vLLM's first releases). The live test
(``tests/vllm_live``) runs vLLM's own publisher; this one also misbehaves on request."""

from __future__ import annotations

import threading
import time
from collections import deque

import msgspec
import zmq

END_SEQ = (-1).to_bytes(8, "big", signed=True)


class Publisher:
    def __init__(
        self,
        topic: bytes = b"",
        buffer: int = 10_000,
        replay: bool = True,
        port: int = 0,
        legacy_replay: bool = False,
    ) -> None:
        self.legacy_replay = legacy_replay
        self.context = zmq.Context()
        # XPUB: a PUB to its subscribers, that also sees their subscriptions arrive, so a test
        # can wait for the subscriber instead of sleeping (ZMQ's "slow joiner").
        self.pub = self.context.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.SNDHWM, 1_000_000)
        self.pub.bind(f"tcp://127.0.0.1:{port}")
        self.port = int(self.pub.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.topic = topic
        self.seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer)
        self.replays = 0
        self._stop = threading.Event()
        self.router: zmq.Socket[bytes] | None = None
        self.replay_port: int | None = None
        if replay:
            self.router = self.context.socket(zmq.ROUTER)
            self.router.bind("tcp://127.0.0.1:0")
            endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
            self.replay_port = int(endpoint.rsplit(":", 1)[1])
            self._thread = threading.Thread(target=self._serve_replay, daemon=True)
            self._thread.start()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    def wait_subscribed(self, timeout: float = 10.0) -> None:
        """Block until a subscriber's subscription has arrived (then nothing sent is dropped)."""
        deadline = time.monotonic() + timeout
        while True:  # b"\x01topic" subscribes; b"\x00topic" is a subscriber gone
            left = deadline - time.monotonic()
            if left <= 0 or not self.pub.poll(int(left * 1000)):
                raise TimeoutError(f"no subscriber on {self.endpoint} in {timeout} s")
            if self.pub.recv().startswith(b"\x01"):
                return

    def publish(self, events: list[object], ts: float = 1.0, send: bool = True) -> int:
        """Encode and publish one batch (``send=False``: buffered for replay, never sent live,
        as if the subscriber missed it). Returns its sequence number."""
        payload = msgspec.msgpack.encode([ts, events, 0])
        return self.publish_raw(payload, send=send)

    def publish_raw(self, payload: bytes, send: bool = True, seq: int | None = None) -> int:
        with self._lock:
            if seq is None:
                seq = self.seq
                self.seq += 1
            self.buffer.append((seq, payload))
            if send:
                self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def send_frames(self, frames: list[bytes]) -> None:
        with self._lock:
            self.pub.send_multipart(frames)

    def _serve_replay(self) -> None:
        assert self.router is not None
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            frames = self.router.recv_multipart()
            if len(frames) != 3:
                continue
            client, _, start = frames
            self.replays += 1
            first = int.from_bytes(start, "big")
            with self._lock:
                buffered = list(self.buffer)
            for seq, payload in buffered:
                if seq >= first:
                    topic = [] if self.legacy_replay else [self.topic]
                    self.router.send_multipart(
                        [client, b"", *topic, seq.to_bytes(8, "big"), payload]
                    )
            self.router.send_multipart(
                [client, b"", *([] if self.legacy_replay else [b""]), END_SEQ, b""]
            )

    def close(self) -> None:
        self._stop.set()
        if self.router is not None:
            self._thread.join(timeout=2)
            self.router.close(linger=0)
        self.pub.close(linger=0)
        self.context.term()
