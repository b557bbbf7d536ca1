"""The reference engine's KV memory: pools, the prefix cache, lower tiers, a request's blocks.

It allocates and releases blocks and reads and writes K/V; it never decides which request runs
or is preempted (the scheduler does) and keeps no statistics (telemetry does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvstats.capacity import (
    GroupFootprint,
    full_attention_blocks,
    kv_cache_size_tokens,
    max_concurrency,
    sliding_window_blocks,
)
from kvstats.snapshot import KVGroup

from .model import DTYPES, ToyModel
from .pool import BlockPool
from .prefix_cache import ROOT_HASH, Node, PrefixCache, block_hash
from .request import TIERS, EngineConfig, Request, RequestRejected
from .tiers import HostTier, StorageTier


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def gpu_uuid(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    raw = getattr(props, "uuid", None)
    return None if raw is None else f"GPU-{raw}"


class KVManager:
    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        shape = config.shape
        bs = config.block_size
        full_bpt = shape.bytes_per_token(shape.full_layers)
        swa_bpt = shape.bytes_per_token(shape.swa_layers) if shape.hybrid else 0
        full_tokens = int(config.kv_memory_bytes / (full_bpt + config.swa_pool_ratio * swa_bpt))
        self.full_pool = BlockPool("full", shape, shape.full_layers, full_tokens // bs, bs, device)
        self.swa_pool: BlockPool | None = None
        if shape.hybrid:
            swa_blocks = int(full_tokens * config.swa_pool_ratio) // bs
            self.swa_pool = BlockPool("swa", shape, shape.swa_layers, swa_blocks, bs, device)

        block_shape = tuple(self.full_pool.kv.shape[1:])
        self.host = (
            HostTier(config.host_tier_tokens // bs, (bs, *block_shape), DTYPES[shape.dtype])
            if config.host_tier_tokens
            else None
        )
        self.storage = (
            StorageTier(config.storage_dir, config.storage_tier_tokens // bs)
            if config.storage_dir is not None and config.storage_tier_tokens
            else None
        )
        self.cache = PrefixCache(self.full_pool, on_evict=self._back_up)

        self.groups = self._groups()
        self.max_concurrency = max_concurrency(
            {p.name: p.num_blocks for p in self.pools},
            [GroupFootprint(g.pool, g.blocks_per_request) for g in self.groups],
        )
        # vLLM's definition, so the same model reads the same capacity on every engine path.
        self.capacity_tokens = (
            None
            if self.max_concurrency is None
            else kv_cache_size_tokens(self.max_concurrency, config.max_model_len)
        )

    # ------------------------------------------------------------------------- shape

    @property
    def pools(self) -> list[BlockPool]:
        return [self.full_pool] + ([self.swa_pool] if self.swa_pool is not None else [])

    def _groups(self) -> tuple[KVGroup, ...]:
        cfg, shape = self.config, self.config.shape
        groups = [
            KVGroup(
                name="full",
                kind="full_attention",
                pool="full",
                blocks_per_request=full_attention_blocks(cfg.max_model_len, cfg.block_size),
            )
        ]
        if shape.hybrid:
            assert shape.sliding_window is not None
            groups.append(
                KVGroup(
                    name="swa",
                    kind="sliding_window",
                    pool="swa",
                    # One token in flight per step: prefill writes only the window's tail.
                    blocks_per_request=sliding_window_blocks(
                        cfg.max_model_len, cfg.block_size, shape.sliding_window, 1
                    ),
                    sliding_window=shape.sliding_window,
                )
            )
        return tuple(groups)

    def check_fits(self, tokens: int) -> None:
        """Refuse a request that no amount of waiting would make fit."""
        if -(-tokens // self.config.block_size) > self.full_pool.num_blocks:
            raise RequestRejected("request needs more KV blocks than the whole pool holds")
        swa = next((g for g in self.groups if g.pool == "swa"), None)
        if (
            self.swa_pool is not None
            and swa is not None
            and swa.blocks_per_request > self.swa_pool.num_blocks
        ):
            raise RequestRejected("the sliding-window pool is smaller than one request's window")

    def pool_counts(self, pool: BlockPool) -> tuple[int, int, int]:
        """(used, evictable, available) token slots; O(1)."""
        bs = pool.block_size
        evictable = self.cache.evictable_blocks if pool is self.full_pool else 0
        free = pool.num_free_blocks
        return (pool.num_blocks - free - evictable) * bs, evictable * bs, free * bs

    # ------------------------------------------------------------------ admission

    def match(self, request: Request) -> list[Node]:
        """The request's cached prefix now (nothing pinned). At least one token is computed,
        so that prefill yields the next token's logits: the last token is never looked up."""
        return self.cache.match(request.tokens[: len(request.tokens) - 1])

    def allocate_for_admission(
        self, request: Request, path: list[Node] | None = None
    ) -> dict[str, int] | None:
        """Blocks for the whole request, cached prefix first (``path``: ``match``'s answer,
        when the caller just asked); the hit tokens by tier, or None (and nothing held) when
        the pools cannot take it now."""
        bs = self.config.block_size
        tokens = request.tokens
        cacheable = len(tokens) - 1
        hits = dict.fromkeys(TIERS, 0)
        if path is None:
            path = self.match(request)
        self.cache.pin_all(path)
        request.nodes += path
        request.block_table += [node.block for node in path]
        hits["device"] = len(path) * bs
        self._load_from_lower_tiers(request, cacheable, hits)
        request.num_computed = len(request.block_table) * bs

        needed = -(-len(tokens) // bs) - len(request.block_table)
        for _ in range(needed):
            block = self.cache.allocate()
            if block is None:
                self.release(request)
                return None
            request.block_table.append(block)
            request.nodes.append(None)
        if self.swa_pool is not None and not self._allocate_swa(request, len(tokens)):
            self.release(request)
            return None
        return hits

    def _load_from_lower_tiers(
        self, request: Request, cacheable: int, hits: dict[str, int]
    ) -> None:
        if self.host is None and self.storage is None:
            return
        bs = self.config.block_size
        tokens = request.tokens
        parent = request.nodes[-1] if request.nodes else self.cache.root
        assert parent is not None
        pos = len(request.block_table) * bs
        while pos + bs <= cacheable:
            key = tuple(tokens[pos : pos + bs])
            digest = block_hash(parent.hash, key)
            tier, data = "host", self.host.get(digest) if self.host is not None else None
            if data is None:
                tier, data = (
                    "storage",
                    self.storage.get(digest) if self.storage is not None else None,
                )
            if data is None:
                return
            block = self.cache.allocate()
            if block is None:
                return
            self.full_pool.load_block(block, data.to(self.device))
            node = self.cache.insert(parent, key, block, digest)
            assert node is not None, "match() stopped at this block, so it cannot be cached"
            request.nodes.append(node)
            request.block_table.append(block)
            hits[tier] += bs
            parent = node
            pos += bs

    def _allocate_swa(self, request: Request, length: int) -> bool:
        """SWA blocks for the window's tail of positions [0, length): older ones are never held."""
        assert self.swa_pool is not None and self.config.shape.sliding_window is not None
        bs = self.config.block_size
        first = max(0, length - self.config.shape.sliding_window) // bs
        request.swa_table = [-1] * first
        request.swa_released = first
        for _ in range(first, -(-length // bs)):
            block = self.swa_pool.pop_free()
            if block is None:
                return False
            request.swa_table.append(block)
        return True

    # ------------------------------------------------------------------------ K/V

    def write_kv(
        self, model: ToyModel, request: Request, start: int, end: int, prefill: bool
    ) -> None:
        """Write K/V of positions [start, end); on prefill, rebuild the whole SWA window.

        SWA blocks are per-request and never cached (SGLang's SWA rings), so after a prefix
        hit the window's K/V for cached positions is recomputed, not read from the cache.
        """
        tokens = request.tokens
        full_layers = self.config.shape.full_layers
        swa_start = kv_start = start
        if self.swa_pool is not None:
            assert self.config.shape.sliding_window is not None
            window_start = max(0, end - self.config.shape.sliding_window)
            swa_start = window_start if prefill else max(start, window_start)
            kv_start = min(start, swa_start)
        kv = model.kv(tokens[kv_start:end], kv_start)
        self.full_pool.write(
            self.full_pool.slots(request.block_table, start, end),
            kv[start - kv_start :, :full_layers],
        )
        if self.swa_pool is not None:
            slots = self.swa_pool.slots(request.swa_table, swa_start, end)
            self.swa_pool.write(slots, kv[swa_start - kv_start :, full_layers:])
        request.num_computed = end
        self._commit_full_blocks(request)

    def _commit_full_blocks(self, request: Request) -> None:
        """Insert newly filled blocks into the prefix cache (and write them through to storage)."""
        bs = self.config.block_size
        tokens = request.tokens
        keys = request.prefix_keys  # the prompt's chain hashes, when already computed
        inserted: list[Node] = []
        for i in range(request.committed_blocks, request.num_computed // bs):
            if request.nodes[i] is not None:
                request.committed_blocks = i + 1
                continue
            parent = self.cache.root if i == 0 else request.nodes[i - 1]
            if parent is None:
                break  # an uncached (duplicate) block breaks the chain: the rest stays private
            node = self.cache.insert(
                parent,
                tuple(tokens[i * bs : (i + 1) * bs]),
                request.block_table[i],
                keys[i] if keys is not None and i < len(keys) else None,
                announce=False,
            )
            if node is None:
                break
            inserted.append(node)
            request.nodes[i] = node
            request.committed_blocks = i + 1
            if self.storage is not None:
                self.storage.put(node.hash, self.full_pool.block_data(node.block))
        self.cache.announce_held(inserted)  # one call for the request's new blocks

    def next_token(self, model: ToyModel, request: Request) -> int:
        tokens = request.tokens
        n = len(tokens)
        full = self.full_pool.read(self.full_pool.slots(request.block_table, 0, n))
        keys, values = full[:, 0, 0], full[:, 0, 1]
        if self.swa_pool is not None:
            assert self.config.shape.sliding_window is not None
            start = max(0, n - self.config.shape.sliding_window)
            swa = self.swa_pool.read(self.swa_pool.slots(request.swa_table, start, n))
            keys = torch.cat([keys, swa[:, 0, 0]])
            values = torch.cat([values, swa[:, 0, 1]])
        return model.next_token(tokens[-1], keys, values)

    # ---------------------------------------------------------------- growth

    def grow(self, request: Request, position: int) -> bool:
        """Blocks for ``position`` in every pool; False when a pool is out of blocks (the
        scheduler then frees some by preemption and asks again)."""
        bs = self.config.block_size
        if self.swa_pool is not None:
            self._slide_window(request, position)
        while True:
            need_full = position // bs >= len(request.block_table)
            need_swa = self.swa_pool is not None and position // bs >= len(request.swa_table)
            if not need_full and not need_swa:
                return True
            if need_full:
                block = self.cache.allocate()
                if block is None:
                    return False
                request.block_table.append(block)
                request.nodes.append(None)
            elif self.swa_pool is not None:
                block = self.swa_pool.pop_free()
                if block is None:
                    return False
                request.swa_table.append(block)

    def _slide_window(self, request: Request, position: int) -> None:
        """Release SWA blocks that attention at ``position`` can no longer see."""
        assert self.swa_pool is not None and self.config.shape.sliding_window is not None
        first_visible = max(0, position - self.config.shape.sliding_window + 1)
        for i in range(request.swa_released, first_visible // self.config.block_size):
            if request.swa_table[i] >= 0:
                self.swa_pool.release(request.swa_table[i])
                request.swa_table[i] = -1
            request.swa_released = i + 1

    # -------------------------------------------------------------- release paths

    def prefix_keys(
        self,
        tokens: list[int],
        path: list[Node],
        go_on: Callable[[bytes], bool],
        known: list[bytes] | None = None,
    ) -> list[bytes]:
        """Chain hashes of the full blocks a lookup of ``tokens`` may hit (the last token is
        always computed), root first: the blocks' identities across evictions and tiers.
        The cached ones' (``path``, ``match``'s answer) are on their nodes; past them, blocks
        are hashed while ``go_on(hash)`` (the request reuses them when it inserts them), or
        taken from ``known`` (an earlier attempt's keys)."""
        bs = self.config.block_size
        keys = [node.hash for node in path]
        known = known or []
        parent = keys[-1] if keys else ROOT_HASH
        for start in range(len(keys) * bs, len(tokens) - bs, bs):
            i = start // bs
            parent = (
                known[i]
                if i < len(known)
                else block_hash(parent, tuple(tokens[start : start + bs]))
            )
            keys.append(parent)
            if not go_on(parent):
                break
        return keys

    def release(self, request: Request) -> None:
        """Give back every block the request holds (its cached ones stay, evictable).

        Leaf first: a parent is released last, so it is at least as recent as its children
        (the radix cache evicts leaves first; recency then agrees with that)."""
        pairs = list(zip(request.block_table, request.nodes, strict=True))
        cached = []
        for block, node in reversed(pairs):
            if node is not None:
                cached.append(node)
            else:
                self.full_pool.release(block)
        self.cache.unpin_all(cached)
        if self.swa_pool is not None:
            for block in request.swa_table:
                if block >= 0:
                    self.swa_pool.release(block)
        request.block_table, request.nodes, request.swa_table = [], [], []
        request.committed_blocks = request.swa_released = 0
        request.num_computed = 0

    def _back_up(self, node: Node) -> None:
        """Eviction hook: keep the block's K/V in host DRAM (HiCache L2) before reuse."""
        if self.host is not None:
            self.host.put(node.hash, self.full_pool.block_data(node.block))

    def close(self) -> None:
        if self.storage is not None:
            self.storage.close()
