"""Built-in workloads that drive the reference engine into the states operators care about.

- ``agentic``: a lead agent keeps a small context running while rounds of sub-agents share a
  long task prefix and finish, leaving their KV behind as evictable prefix cache. Between
  rounds active usage is ~2 % while the pool is physically ~70 %+ occupied (SGLang's case).
  Tasks come back with Zipf-like popularity from a library about three pools large, and each
  sub-agent comes back (its tool call done) with its whole context once about 1.5 pools of new
  KV has been written, so the what-if curve differs by size: a pool of 2x would keep what
  returns, 1x would not.
- ``chat``: users in multi-turn conversations whose growing histories hit the prefix cache.
- ``burst``: waves of long requests that need more KV than the pool has, forcing preemption.

Sizes scale with the pool, so the same workload shows the same shape on a laptop or a GPU.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable

from .engine import ReferenceEngine, Request

log = logging.getLogger(__name__)

WORKLOADS = ("agentic", "chat", "burst")
TASK_LIBRARY_POOLS = 3  # the agentic tasks' working set, in pools
AGENTS = 4  # sub-agents per agentic round
# A sub-agent's tool call returns once about this many pools of new KV has been written since.
TOOL_CALL_POOLS = 1.5


class Workload:
    def __init__(
        self, engine: ReferenceEngine, kind: str, seed: int = 0, pause: float = 1.5
    ) -> None:
        if kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {kind!r}")
        self.engine = engine
        self.kind = kind
        self.pause = pause
        self.rng = random.Random(seed)
        self.rounds = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        cfg = engine.config
        self.vocab = cfg.shape.vocab_size
        self.capacity = engine.full_pool.capacity_slots
        self.max_len = cfg.max_model_len

    def start(self) -> None:
        targets: list[Callable[[], None]]
        if self.kind == "agentic":
            targets = [self._lead_agent, self._agentic_rounds]
        elif self.kind == "chat":
            targets = [self._chat_user] * 6
        else:
            targets = [self._bursts]
        for i, target in enumerate(targets):
            thread = threading.Thread(
                target=self._guard(target), name=f"workload-{self.kind}-{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    # ---------------------------------------------------------------- helpers

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception:  # a workload bug must be loud, not a silent idle engine
                log.exception("workload %s stopped", self.kind)

        return run

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    def _wait(self, requests: list[Request]) -> bool:
        """Wait for requests; False when the workload is stopping."""
        for request in requests:
            while not request.done.wait(0.1):
                if self._stop.is_set():
                    return False
        return True

    def _fit(self, prompt: list[int], max_tokens: int) -> list[int]:
        return prompt[-(self.max_len - max_tokens) :]

    # ---------------------------------------------------------------- agentic

    def _lead_agent(self) -> None:
        context = self._tokens(max(16, min(self.max_len // 4, self.capacity // 50)))
        while not self._stop.is_set():
            max_tokens = max(1, min(256, self.max_len - len(context) - 1))
            request = self.engine.submit(context, max_tokens)
            if not self._wait([request]):
                return
            context = self._tokens(len(context))  # a new task: the lead agent's context turns over

    def _agentic_rounds(self) -> None:
        shared = max(64, min(self.max_len // 2, self.capacity // 12))
        unique = shared // 4
        library = max(8, TASK_LIBRARY_POOLS * self.capacity // shared)
        tasks = [self._tokens(shared) for _ in range(library)]
        popularity = [1 / (rank + 1) for rank in range(len(tasks))]
        # Each round's agents come back from their tool calls some rounds later with their
        # whole context: whether it is still cached depends on the pool's size. A round writes
        # about a task, each agent's own suffix and one and a half of it for the returning ones.
        new_per_round = shared + AGENTS * (unique + unique // 2 + 48)
        tool_call_rounds = max(2, round(TOOL_CALL_POOLS * self.capacity / new_per_round))
        waiting_on_tools: deque[list[list[int]]] = deque()
        while not self._stop.is_set():
            (task,) = self.rng.choices(tasks, weights=popularity)
            # The orchestrator reads the task first; its sub-agents then hit that prefix.
            planner = self.engine.submit(task, 8)
            if not self._wait([planner]):
                return
            agents = [self.engine.submit(task + self._tokens(unique), 24) for _ in range(AGENTS)]
            returning = []
            if len(waiting_on_tools) >= tool_call_rounds:
                returning = [
                    self.engine.submit(self._fit(context + self._tokens(unique // 2), 24), 24)
                    for context in waiting_on_tools.popleft()
                ]
            if not self._wait(agents + returning):
                return
            waiting_on_tools.append([agent.tokens for agent in agents])
            self.rounds += 1
            self._stop.wait(self.pause)

    # ------------------------------------------------------------------- chat

    def _chat_user(self) -> None:
        history: list[int] = []
        while not self._stop.is_set():
            max_tokens = self.rng.randint(16, 64)
            prompt = self._fit(history + self._tokens(self.rng.randint(16, 64)), max_tokens)
            request = self.engine.submit(prompt, max_tokens)
            if not self._wait([request]):
                return
            history = request.tokens if len(request.tokens) < self.max_len * 3 // 4 else []
            self.rounds += 1
            self._stop.wait(self.rng.uniform(0.1, 0.5))

    # ------------------------------------------------------------------ burst

    def _bursts(self) -> None:
        prompt_len, max_tokens = self.max_len // 4, self.max_len // 2
        count = int(1.5 * self.capacity / (prompt_len + max_tokens)) + 1
        while not self._stop.is_set():
            wave = [self.engine.submit(self._tokens(prompt_len), max_tokens) for _ in range(count)]
            if not self._wait(wave):
                return
            self.rounds += 1
            self._stop.wait(self.pause)
