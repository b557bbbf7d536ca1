"""A paged KV pool: one torch tensor of fixed-size blocks and a free list.

Counts are kept incrementally so that reading them is O(1) whatever the pool size; the
prefix cache on top of the pool decides which allocated blocks are evictable.
"""

from __future__ import annotations

from collections import deque

import torch

from .model import DTYPES, ModelShape


class PoolExhausted(RuntimeError):
    """No empty block and nothing evictable."""


class BlockPool:
    def __init__(
        self,
        name: str,
        shape: ModelShape,
        layers: int,
        num_blocks: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"pool {name!r} needs positive num_blocks and block_size")
        self.name = name
        self.layers = layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        self.bytes_per_slot = shape.bytes_per_token(layers)
        # Slot-major layout: flat slot s = block * block_size + offset.
        self.kv = torch.zeros(
            num_blocks * block_size,
            layers,
            2,
            shape.num_kv_heads,
            shape.head_dim,
            dtype=DTYPES[shape.dtype],
            device=device,
        )
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def capacity_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def pop_free(self) -> int | None:
        return self._free.popleft() if self._free else None

    def release(self, block: int) -> None:
        self._free.append(block)

    def write(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Store K/V (``[n, layers, 2, heads, dim]``) into flat slots."""
        self.kv.index_copy_(0, slots, kv)

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        return self.kv.index_select(0, slots)

    def block_data(self, block: int) -> torch.Tensor:
        start = block * self.block_size
        return self.kv[start : start + self.block_size]

    def load_block(self, block: int, data: torch.Tensor) -> None:
        self.block_data(block).copy_(data)

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot indices of token positions [start, end) through a block table."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.long)[positions // self.block_size]
        return (blocks * self.block_size + positions % self.block_size).to(self.device)
