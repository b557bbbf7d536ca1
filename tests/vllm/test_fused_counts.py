"""The counts fused into vLLM's own hash writers and free-queue methods (``fused``): used only
on code the shim was tested with, step for step what vLLM's own methods do, and exact.

Runs in .venv-vllm, once per release of the matrix: a release whose relied-on code is not in
``KNOWN_SOURCES`` fails here, so the table cannot fall behind the matrix.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.vllm_oracle import brute_force_evictable
from devtools.vllm_pool import Driver, manager, new_manager, partial_caching_manager
from engine_shim.adapters.vllm import BlockPoolTracker, EngineFacts, block_layout
from engine_shim.adapters.vllm.fused import (
    RELIED,
    fused_methods,
    rebuilt,
    relied_on,
    source_digest,
    why_not_fused,
)


def test_every_release_of_the_matrix_is_counted_fused_without_the_curve() -> None:
    m, _ = new_manager(32)
    assert why_not_fused(m.block_pool) is None
    assert manager(32, reuse_distances=False)[1].counting == "fused"
    # With the curve, or with partial entries (tokens per block), the general hooks count.
    assert manager(32)[1].counting == "hooks"
    assert partial_caching_manager(32, reuse_distances=False)[1].counting == "hooks"


def test_the_fused_pool_keeps_vllms_queue_state_on_an_instance_of_the_counted_class() -> None:
    """The queue is rebuilt, not swapped in place: its attributes, in vLLM's order, on a new
    instance of the counting subclass (an instance whose class is swapped afterwards would miss
    the interpreter's attribute caches on every access); every node, the list's two ends
    included, of the one counted block class."""
    m, config = new_manager(32)
    pool = m.block_pool
    before = pool.free_block_queue
    state = list(vars(before).items())
    free = [b.block_id for b in before.get_all_free_blocks()]
    facts = EngineFacts(model="t", max_model_len=64)
    tracker = BlockPoolTracker(m, config, facts, reuse_distances=False)
    assert tracker.counting == "fused"
    queue = pool.free_block_queue
    assert queue is not before and type(queue).__bases__ == (type(before),)
    assert list(vars(queue).items()) == state
    assert [b.block_id for b in queue.get_all_free_blocks()] == free
    counted = type(pool.blocks[0])
    assert {type(b) for b in pool.blocks} == {counted}
    assert type(queue.fake_free_list_head) is type(queue.fake_free_list_tail) is counted


def test_an_instance_with_a_dict_is_rebuilt_and_a_slotted_one_swapped_in_place() -> None:
    class Plain:
        def __init__(self) -> None:
            self.b, self.a = 2, 1

    class Slotted:
        __slots__ = ("a",)
        a: int

    instance = Plain()
    copy = rebuilt(instance, type("Sub", (Plain,), {}))
    assert copy is not instance and type(copy).__name__ == "Sub"
    assert list(vars(copy).items()) == [("b", 2), ("a", 1)]
    slotted = Slotted()
    slotted.a = 1
    sub = type("SlottedSub", (Slotted,), {"__slots__": ()})
    assert rebuilt(slotted, sub) is slotted and type(slotted) is sub and slotted.a == 1


@pytest.mark.parametrize(
    "changed",
    ["BlockPool.get_new_blocks", "KVCacheBlock.reset_hash", "FreeKVCacheBlockQueue.append_n"],
)
def test_code_not_seen_in_a_tested_release_is_counted_by_the_general_hooks(
    changed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork or a new release that changed what the fused counting replaces or rests on (the
    pop that evicts, a hash writer, a way into the queue) gets the general hooks: nothing of its
    own is replaced, and its counts stay exact."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue, KVCacheBlock

    owner_name, name = changed.split(".")
    owner = {"BlockPool": BlockPool, "KVCacheBlock": KVCacheBlock}.get(
        owner_name, FreeKVCacheBlockQueue
    )
    original = getattr(owner, name)

    def forks_own(self: Any, *args: Any) -> Any:  # the same effect, other source
        return original(self, *args)

    monkeypatch.setattr(owner, name, forks_own)
    m, config = new_manager(24)
    assert why_not_fused(m.block_pool) == f"code not seen in a tested release: {changed}"
    tracker = BlockPoolTracker(m, config, EngineFacts("t", 1024), reuse_distances=False)
    assert tracker.counting == "hooks"
    d = Driver(m, tracker)
    for i in range(12):  # more than the pool holds: cached blocks are evicted
        r = d.admit([i * 1000 + j for j in range(100)])
        assert r is not None
        d.free(r)
        d.check()


def test_a_function_without_readable_source_is_not_known() -> None:
    assert source_digest(len) is None
    assert source_digest(lambda: None) is not None


def test_every_relied_on_function_is_found_by_name() -> None:
    m, _ = new_manager(16)
    relied = relied_on(m.block_pool)
    assert list(relied) == list(RELIED)
    assert all(callable(function) for function in relied.values())


def fresh_blocks(n: int) -> list[Any]:
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    return [KVCacheBlock(i) for i in range(n)]


def test_the_fused_writers_write_what_vllms_write() -> None:
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    methods = fused_methods(block_layout(KVCacheBlock), 16)
    counts = methods.counts
    ours, theirs = fresh_blocks(1)[0], fresh_blocks(1)[0]
    ours.__class__ = type("Fused", (KVCacheBlock,), {"__slots__": (), **methods.block})
    for block in (ours, theirs):
        block.ref_cnt = 1
        block.set_block_hash(b"k" * 36, num_tokens=7)
    assert repr(ours) == repr(theirs)
    assert (counts.held, counts.blocks) == (1, 0)
    for block in (ours, theirs):
        with pytest.raises(AssertionError, match="already has a hash"):
            block.set_block_hash(b"j" * 36)
        block.reset_hash()
    assert repr(ours) == repr(theirs)
    assert (counts.held, counts.blocks) == (0, 0)  # held: cached, then not; never evictable
    # A block in the free queue (vLLM never hashes one there): evictable while it is cached.
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

    ours.ref_cnt = 0
    queue = FreeKVCacheBlockQueue([ours])
    ours.set_block_hash(b"k" * 36)
    assert (counts.held, counts.blocks) == (0, 1)
    ours.reset_hash()
    assert (counts.held, counts.blocks, queue.num_free_blocks) == (0, 0, 1)


queue_ops = st.lists(
    st.tuples(
        st.sampled_from(
            ["append", "append_n", "prepend_n", "remove", "popleft", "popleft_n", "step"]
        ),
        st.integers(0, 2**31),
    ),
    max_size=80,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=queue_ops, hashed=st.sets(st.integers(0, 23)))
def test_the_fused_queue_moves_blocks_as_vllms_own_and_counts_the_cached_ones(
    ops: list[tuple[str, int]], hashed: set[int]
) -> None:
    """The same operations on vLLM's queue and on the fused one, over twin blocks: the same
    order, the same free count, the same errors, and the fused count is a brute-force one."""
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue, KVCacheBlock

    ours, theirs = fresh_blocks(24), fresh_blocks(24)
    for i in hashed:
        ours[i].set_block_hash(b"%d" % i)
        theirs[i].set_block_hash(b"%d" % i)
    queues = [FreeKVCacheBlockQueue(ours[:12]), FreeKVCacheBlockQueue(theirs[:12])]
    in_queue = sum(1 for i in hashed if i < 12)
    methods = fused_methods(block_layout(KVCacheBlock), 16, in_queue, len(hashed) - in_queue)
    counts = methods.counts
    queues[0].__class__ = type("Fused", (FreeKVCacheBlockQueue,), methods.queue)
    popped_cached = 0  # popped blocks leave the count at their reset (get_new_blocks)
    for op, seed in ops:
        if op == "step":  # the end of a scheduler step: the changes fold into the totals
            assert counts.step_evictable() == counts.blocks
        outcomes = [
            apply(queue, blocks, op, seed)
            for queue, blocks in zip(queues, (ours, theirs), strict=True)
        ]
        assert [error for error, _ in outcomes] == [outcomes[1][0]] * 2
        popped_cached += sum(1 for b in outcomes[0][1] if b.block_hash is not None)
        order = [[b.block_id for b in q.get_all_free_blocks()] for q in queues]
        assert order[0] == order[1]
        assert queues[0].num_free_blocks == queues[1].num_free_blocks == len(order[0])
        in_queue = sum(1 for b in queues[0].get_all_free_blocks() if b.block_hash is not None)
        assert counts.blocks == in_queue + popped_cached
        assert counts.hashed == len(hashed)


def apply(queue: Any, blocks: list[Any], op: str, seed: int) -> tuple[type | None, list[Any]]:
    """One queue operation, chosen the same way for both queues: (error raised, popped)."""
    rng = random.Random(seed)
    outside = [b for b in blocks if b.prev_free_block is None]
    inside = queue.get_all_free_blocks()
    try:
        if op == "append" and outside:
            queue.append(rng.choice(outside))
        elif op in ("append_n", "prepend_n"):
            getattr(queue, op)(rng.sample(outside, rng.randint(0, len(outside))))
        elif op == "remove":  # sometimes a block outside the queue: vLLM raises
            queue.remove(rng.choice(blocks if rng.random() < 0.2 else inside or blocks))
        elif op == "popleft":
            return None, [queue.popleft()]
        elif op == "popleft_n" and inside:
            return None, queue.popleft_n(rng.randint(0, len(inside)))
    except (RuntimeError, ValueError) as exc:
        return type(exc), []
    return None, []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), size=st.sampled_from([24, 48, 200]))
def test_fused_counts_equal_a_brute_force_count_through_eviction_and_resets(
    seed: int, size: int
) -> None:
    """Small pools: almost every allocation pops a cached block (evicted at its reset)."""
    m, tracker = manager(size, reuse_distances=False, kv_events=True)
    assert tracker.counting == "fused"
    d = Driver(m, tracker)
    rng = random.Random(seed)
    for _ in range(40):
        action = rng.random()
        if action < 0.45 or not d.running:
            prefix = [rng.randrange(3) * 1000 + j for j in range(rng.randint(0, 80))]
            d.admit(prefix + [rng.randrange(30000) for _ in range(rng.randint(1, 120))])
        elif action < 0.8:
            request = rng.choice(list(d.running.values()))
            if not d.decode(request, rng.randrange(30000)):
                d.preempt(request)
        elif action < 0.97:
            d.free(rng.choice(list(d.running.values())))
        else:
            for request in list(d.running.values()):
                d.free(request)
            assert m.reset_prefix_cache()
            assert (tracker.evictable_blocks, tracker.cached_blocks) == (0, 0)
        if rng.random() < 0.3:
            tracker.note_step()  # the end of a schedule(): the fused counts fold their changes
        d.check()
    assert brute_force_evictable(m.block_pool) == tracker.evictable_blocks


def test_only_get_new_blocks_pops_blocks_from_the_free_queue() -> None:
    """Popped blocks leave the fused count when ``get_new_blocks`` resets their hash: this
    release's whole source is read for any other pop (besides the null block's at start)."""
    import vllm

    root = Path(vllm.__file__).parent
    pops = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_bytes()
        if b"popleft" not in source:
            continue
        tree = ast.parse(source, str(path))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for call in ast.walk(function):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr in ("popleft", "popleft_n")
                    and "free_block_queue" in ast.unparse(call.func.value)
                ):
                    pops.append((str(path.relative_to(root)), function.name))
    assert sorted(set(pops)) == [
        ("v1/core/block_pool.py", "__init__"),
        ("v1/core/block_pool.py", "get_new_blocks"),
    ]


def test_with_vllms_stats_off_the_prefix_counters_are_counted_where_recorded() -> None:
    """``--disable-log-stats``: vLLM keeps no prefix-cache stats, so the shim counts each
    admission where the scheduler records it, curve or not."""
    m, config = new_manager(64)
    m.log_stats, m.prefix_cache_stats = False, None
    tracker = BlockPoolTracker(m, config, EngineFacts("t", 1024), reuse_distances=False)
    assert tracker.counting == "fused" and not tracker._vllms_prefix_stats
    d = Driver(m, tracker)
    for i in range(3):
        r = d.admit(list(range(100)) + [1000 * (i + 1)] * 20)
        assert r is not None
        d.free(r)
    assert tracker.prefix_totals() == (d.first_queries, d.first_hits) == (360, 192)
    assert tracker.snapshot(0, 0).counters.prefix_hit_tokens == {"device": 192}
