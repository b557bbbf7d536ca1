"""A toy transformer whose K/V really live in paged KV pools.

The arithmetic is small (one attention read per decode step) but honest: a token's K/V are a
deterministic function of (token, position), written into its slot, and the next token is read
back from those slots through the block table. So a prefix-cache hit, a host-tier load-back or a
storage-tier load must reproduce exactly the output of a cold run, and tests can check that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str = "reference-tiny"
    num_layers: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    dtype: str = "float16"
    vocab_size: int = 4096
    # Hybrid models: this many of num_layers use sliding-window attention in their own pool.
    swa_layers: int = 0
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.swa_layers < self.num_layers:
            raise ValueError("swa_layers must be in [0, num_layers)")
        if self.swa_layers and (self.sliding_window is None or self.sliding_window <= 0):
            raise ValueError("a hybrid model (swa_layers > 0) needs a positive sliding_window")

    @property
    def hybrid(self) -> bool:
        return self.swa_layers > 0

    @property
    def full_layers(self) -> int:
        return self.num_layers - self.swa_layers

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    def bytes_per_token(self, layers: int) -> int:
        """K and V for every head of ``layers`` layers."""
        return layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize


class ToyModel:
    """Deterministic weights from a seed; K/V of (token, position) and a greedy next token."""

    def __init__(self, shape: ModelShape, device: torch.device, seed: int = 0) -> None:
        self.shape = shape
        self.device = device
        gen = torch.Generator().manual_seed(seed)
        per_layer = (2, shape.num_kv_heads, shape.head_dim)
        self.embed = torch.randn(shape.vocab_size, shape.num_layers, *per_layer, generator=gen)
        self.pos = torch.randn(256, shape.num_layers, *per_layer, generator=gen) * 0.1
        self.query = torch.randn(
            shape.vocab_size, shape.num_kv_heads, shape.head_dim, generator=gen
        )
        self.unembed = torch.randn(
            shape.num_kv_heads * shape.head_dim, shape.vocab_size, generator=gen
        )
        dtype = DTYPES[shape.dtype]
        self.embed = self.embed.to(device=device, dtype=dtype)
        self.pos = self.pos.to(device=device, dtype=dtype)
        self.query = self.query.to(device=device, dtype=torch.float32)
        self.unembed = self.unembed.to(device=device, dtype=torch.float32)

    def kv(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """K/V for consecutive positions: ``[n, num_layers, 2, heads, head_dim]``."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(start_pos, start_pos + len(tokens), device=self.device) % 256
        return self.embed[ids] + self.pos[positions]

    def next_token(self, last_token: int, keys: torch.Tensor, values: torch.Tensor) -> int:
        """One attention read over the context's K/V (``[ctx, heads, head_dim]``), greedy."""
        q = self.query[last_token]
        scores = (keys.float() * q).sum(-1) / self.shape.head_dim**0.5  # [ctx, heads]
        weights = torch.softmax(scores, dim=0)
        out = (weights.unsqueeze(-1) * values.float()).sum(0).reshape(-1)
        return int(torch.argmax(out @ self.unembed).item())
