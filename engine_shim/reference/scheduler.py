"""The reference engine's scheduler: admission by free blocks, prefill, decode, preemption.

It decides which request runs and which is preempted (the newest running one, recompute
style); the KV manager does the allocating, and telemetry the counting.
"""

from __future__ import annotations

from collections import deque

from .kv_manager import KVManager
from .model import ToyModel
from .request import EngineConfig, Request
from .telemetry import Telemetry


class Scheduler:
    def __init__(
        self, config: EngineConfig, kv: KVManager, model: ToyModel, telemetry: Telemetry
    ) -> None:
        self.config = config
        self.kv = kv
        self.model = model
        self.telemetry = telemetry
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def step(self) -> tuple[int, int, int]:
        """One iteration: admit, prefill, decode. (admitted, prefill tokens, decoded)."""
        admitted = self._admit()
        prefill_tokens = sum(len(r.tokens) - r.num_computed for r in admitted)
        for request in admitted:
            self._prefill(request)
        decoding = [r for r in self.running if r not in admitted]
        decoded = 0
        for request in decoding:
            if request in self.running and self._decode(request):
                decoded += 1
        self.telemetry.iterations += 1
        return len(admitted), prefill_tokens, decoded

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        while self.waiting and len(self.running) < self.config.max_running:
            request = self.waiting[0]
            first = not request.admitted_once
            path = self.kv.match(request)
            # Distances are taken before admission pins the prompt's cached blocks.
            observed = self.telemetry.reuse_observation(request, path) if first else None
            hits = self.kv.allocate_for_admission(request, path)
            if hits is None:
                break
            if first:
                request.admitted_once = True
                request.cached_tokens = hits
                self.telemetry.admitted(request, hits, observed)
            self.waiting.popleft()
            self.running.append(request)
            admitted.append(request)
        return admitted

    def _prefill(self, request: Request) -> None:
        self.kv.write_kv(self.model, request, request.num_computed, len(request.tokens), True)
        self._emit(request, self.kv.next_token(self.model, request))

    def _decode(self, request: Request) -> bool:
        """Write the last token's K/V and sample the next; False when the request was preempted."""
        position = len(request.tokens) - 1
        while not self.kv.grow(request, position):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        self.kv.write_kv(self.model, request, position, position + 1, False)
        self._emit(request, self.kv.next_token(self.model, request))
        return True

    def _emit(self, request: Request, token: int) -> None:
        request.output.append(token)
        if len(request.output) >= request.max_tokens:
            request.finish_reason = "length"
        elif len(request.tokens) >= self.config.max_model_len:
            request.finish_reason = "max_model_len"
        if request.finish_reason is not None:
            # Release at once: a finished request must never become a preemption victim.
            self.kv.release(request)
            self.running.remove(request)
            request.done.set()

    def _preempt(self, request: Request) -> None:
        """Recompute-style preemption: drop its KV (cached blocks stay evictable), requeue first."""
        self.kv.release(request)
        self.running.remove(request)
        self.waiting.appendleft(request)
        self.telemetry.preemptions += 1
