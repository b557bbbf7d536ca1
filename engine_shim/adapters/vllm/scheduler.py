"""``KVCacheShimScheduler``: vLLM's scheduler plus the KV stats endpoint.

Monitoring never takes serving down. Whatever the shim does not recognise in the installed
vLLM (a renamed block field, a missing scheduler hook, a future release, a fork), vLLM starts
and serves: the shim logs one ERROR naming the vLLM version and what it could not find, and
serves a snapshot whose status is ``unsupported`` with that reason, holding only what vLLM's
public pool API still tells exactly (used and free blocks). Only a bad value of the shim's own
settings stops the start (the operator asked for something that cannot be done).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ... import __version__
from ..live import LiveView, ShimEndpoint
from .blocks import UnsupportedVllm
from .facts import (
    facts_from_config,
    fallback_facts,
    iteration_log_enabled,
    listen_address,
    log,
    reuse_distances_enabled,
    vllm_version,
)
from .tracker import BlockPoolTracker, LiveCapacity, PublicPoolView

# Scheduler methods that change the block pool or the request queues, all called on the engine
# core's thread. They run under the shim's lock so that a stats reader never sees a pool in
# mid-update, and each marks when the engine's state was last known current.
POOL_MUTATORS = (
    "schedule",
    "update_from_output",
    "add_request",
    "finish_requests",
    "reset_prefix_cache",
    "update_draft_token_ids",
)
# Other scheduler internals the shim relies on; a missing one makes the numbers partial.
SCHEDULER_HOOKS = ("_preempt_request", "shutdown", "get_request_counts")

Tracker = BlockPoolTracker | PublicPoolView


def missing_hooks(base: type) -> list[str]:
    return [n for n in POOL_MUTATORS + SCHEDULER_HOOKS if not callable(getattr(base, n, None))]


def attach_tracker(scheduler: Any, missing: list[str], reuse_distances: bool) -> Tracker | None:
    """The exact tracker where this vLLM is recognised, else the public-API view (and one
    ERROR line); ``None`` only where even vLLM's public pool API is gone."""
    cache_config = getattr(getattr(scheduler, "vllm_config", None), "cache_config", None)
    try:
        if missing:
            raise UnsupportedVllm(f"the scheduler has no {', '.join(missing)}")
        facts = facts_from_config(scheduler.vllm_config, scheduler.kv_cache_config)
        tracker: Tracker = BlockPoolTracker(
            scheduler.kv_cache_manager,
            scheduler.kv_cache_config,
            facts,
            reuse_distances=reuse_distances,
        )
    except Exception as exc:  # anything unexpected: say so, never stop vLLM
        reason = f"vLLM {vllm_version()} is not supported by kvcache shim {__version__}: {exc}"
        try:
            pool = scheduler.kv_cache_manager.block_pool
            tracker = PublicPoolView(pool, fallback_facts(scheduler.vllm_config), reason)
        except Exception as inner:
            log.error(
                "kvcache shim: %s; vLLM's public block-pool API is gone too (%s): no KV stats"
                " are served. vLLM keeps serving.",
                reason,
                inner,
            )
            return None
        log.error(
            "kvcache shim: %s. vLLM keeps serving; the KV stats say 'unsupported' and hold only"
            " used/free blocks (no evictable count). Upgrade the shim or remove --scheduler-cls.",
            reason,
        )
    if cache_config is not None:
        tracker.capacity = LiveCapacity(cache_config, tracker.facts.max_model_len)
    return tracker


def _request_counts(scheduler: Any) -> Callable[[], tuple[int, int]]:
    get = getattr(scheduler, "get_request_counts", None)
    if callable(get):
        return get  # type: ignore[no-any-return]
    return lambda: (len(getattr(scheduler, "running", ())), len(getattr(scheduler, "waiting", ())))


def _bookkeeping_failed(scheduler: Any, exc: BaseException) -> None:
    """The shim's own per-step work raised: vLLM's step goes on; the snapshot says so from now
    on (its iterations or peaks may be behind), and the log says it once."""
    tracker = scheduler.kvcache_tracker
    if tracker is not None and tracker.problem is None:
        tracker.problem = f"per-step bookkeeping failed: {exc!r}"[:300]
        log.error("kvcache shim: per-step bookkeeping failed (%r); vLLM keeps serving", exc)


def kv_event_sources(scheduler: Any, dp_rank: int) -> dict[str, Any]:
    """What vLLM's ``GET /kv_event_sources`` says of this engine's publisher, served on the
    shim's port too (an exporter with ``events: {discover: true}`` on a shim target). Empty
    when vLLM publishes no events, or when this release does not say where."""
    try:
        config = scheduler.kv_event_publisher.get_publisher_config()
        if config is None or not config.enable_kv_cache_events or config.publisher != "zmq":
            return {}
        return {
            str(dp_rank): {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": str(config.endpoint),
                "replay_endpoint": None
                if config.replay_endpoint is None
                else str(config.replay_endpoint),
                "topic": str(config.topic),
            }
        }
    except Exception:  # monitoring never takes serving down: an unknown release says nothing
        return {}


def _startup_line(tracker: Tracker, host: str, port: int, log_steps: bool) -> None:
    facts = tracker.facts
    if isinstance(tracker, BlockPoolTracker):
        hooked = (
            f"verified KVCacheBlock.{{ref_cnt,{tracker.layout.hash_field},is_null}} and"
            f" {len(POOL_MUTATORS + SCHEDULER_HOOKS)} scheduler hooks; counting "
            + (
                "fused into vLLM's hash writers and free queue"
                if tracker.counting == "fused"
                else "by hooks on vLLM's hash writers and free queue"
            )
            + f"; what-if curve {'on' if tracker.reuse is not None else 'off'}"
        )
    else:
        hooked = "UNSUPPORTED: used/free blocks only"
    log.info(
        "kvcache shim %s: %s; %s; %d blocks of %d tokens; KV stats for DP rank %d at"
        " http://%s:%d/v1/kv/stats%s",
        __version__,
        facts.version.split(",")[0],
        hooked,
        int(tracker.pool.num_gpu_blocks),
        tracker.block_size,
        facts.dp_rank,
        host,
        port,
        "; one KV line per step" if log_steps else "",
    )


class ShimScheduling:
    """What the shim adds to vLLM's scheduler, as a mixin placed before vLLM's class (which is
    only known once vLLM is imported: ``_scheduler_class``). ``super()`` is vLLM's scheduler."""

    _kvcache_view: LiveView[Tracker] | None = None
    _kvcache_endpoint: ShimEndpoint | None = None
    _kvcache_log_steps = False
    kvcache_tracker: Tracker | None = None
    kvcache_missing_hooks: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A bad value of the shim's own settings stops the start early, before vLLM's.
        reuse_distances = reuse_distances_enabled()
        self._kvcache_log_steps = iteration_log_enabled()
        super().__init__(*args, **kwargs)
        tracker = attach_tracker(self, list(self.kvcache_missing_hooks), reuse_distances)
        if tracker is None:
            return
        self.kvcache_tracker = tracker
        self._kvcache_view = LiveView(tracker, _request_counts(self))
        self._start_endpoint(tracker)

    def _start_endpoint(self, tracker: Tracker) -> None:
        from ...server import ShimApp

        facts = tracker.facts
        host, port = listen_address(facts.dp_rank)
        view = self._kvcache_view
        assert view is not None
        self._kvcache_endpoint = ShimEndpoint(
            ShimApp(
                snapshots=lambda: [view.snapshot()],
                healthy=lambda: True,
                bearer_token=os.environ.get("KVCACHE_SHIM_TOKEN") or None,
                kv_event_sources=lambda: kv_event_sources(self, facts.dp_rank),
            ),
            host,
            port,
            facts.dp_rank,
            engine="vLLM",
            log=log,
        )
        endpoint = self._kvcache_endpoint
        if endpoint.start():
            _startup_line(tracker, host, endpoint.server.port, self._kvcache_log_steps)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        view = self._kvcache_view
        if view is None:
            return super().schedule(*args, **kwargs)  # type: ignore[misc]
        with view.lock:
            output = super().schedule(*args, **kwargs)  # type: ignore[misc]
            try:
                if output.total_num_scheduled_tokens > 0:
                    view.steps_in_flight += 1
                view.tracker.note_step()
            except Exception as exc:
                _bookkeeping_failed(self, exc)
            view.touched()
        return output

    def update_from_output(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        view = self._kvcache_view
        if view is None:
            return super().update_from_output(scheduler_output, *args, **kwargs)  # type: ignore[misc]
        with view.lock:
            result = super().update_from_output(scheduler_output, *args, **kwargs)  # type: ignore[misc]
            try:
                self._count_step(view, scheduler_output, result)
            except Exception as exc:
                _bookkeeping_failed(self, exc)
            view.touched()
        return result

    def _count_step(self, view: LiveView[Tracker], scheduler_output: Any, result: Any) -> None:
        if scheduler_output.total_num_scheduled_tokens > 0:
            view.steps_in_flight = max(0, view.steps_in_flight - 1)
        # An iteration is a step that returned output to a client, as vLLM's
        # iteration_tokens_total counts; async scheduling's extra step after a request's
        # last token (its output is discarded) is not one.
        if any(outputs.outputs for outputs in result.values()):
            view.tracker.iterations += 1
            if self._kvcache_log_steps:
                log.info(view.tracker.step_line(*view._counts()))
        # No high-water mark here: update_from_output only frees blocks, which lowers used and
        # never raises used + evictable; schedule() (every allocation) notes them.


def _preempt_request(self: Any, *args: Any, **kwargs: Any) -> Any:
    if self.kvcache_tracker is not None:
        self.kvcache_tracker.preemptions += 1  # inside schedule(): the lock is held
    return super(ShimScheduling, self)._preempt_request(*args, **kwargs)


def _shutdown(self: Any) -> None:
    if self._kvcache_endpoint is not None:
        self._kvcache_endpoint.stop()
    super(ShimScheduling, self).shutdown()


def _locked(name: str) -> Callable[..., Any]:
    """A vLLM scheduler method run under the view's lock, marking the state current after."""

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        view: LiveView[Tracker] | None = self._kvcache_view
        if view is None:
            return getattr(super(ShimScheduling, self), name)(*args, **kwargs)
        with view.lock:
            result = getattr(super(ShimScheduling, self), name)(*args, **kwargs)
            view.touched()
        return result

    method.__name__ = name
    return method


def _scheduler_class() -> type:
    """``ShimScheduling`` over vLLM's scheduler; the hooks it wraps only where vLLM has them."""
    try:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler as Base
    except ImportError:  # a vLLM without it: the synchronous scheduler, same interface
        from vllm.v1.core.sched.scheduler import Scheduler as Base

    def has(name: str) -> bool:
        return callable(getattr(Base, name, None))

    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": "vLLM's scheduler plus the KV stats endpoint (see the package docstring).",
        "kvcache_missing_hooks": tuple(missing_hooks(Base)),
    }
    for name in ("add_request", "finish_requests", "reset_prefix_cache", "update_draft_token_ids"):
        if has(name):
            namespace[name] = _locked(name)
    for name, method in (("_preempt_request", _preempt_request), ("shutdown", _shutdown)):
        if has(name):  # only override what the base has
            namespace[name] = method
    return type("KVCacheShimScheduler", (ShimScheduling, Base), namespace)
