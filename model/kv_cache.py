"""Paged KV cache: a fixed pool of blocks, per-sequence block tables, and prefix caching.

A sequence is admitted only when the pool holds blocks for its whole budget (prompt + max_tokens),
so a running sequence never runs out mid-flight. Full prompt blocks are hashed (chained over the
prefix, as vLLM does); a later prompt with the same prefix reuses them instead of recomputing.
Freed blocks stay cached (LRU) until the pool needs them for something else.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from moray.model.config import MixtralConfig


class KVCache:
    """k/v [layers, num_blocks, block_size, K, d] in the model dtype on the model device."""

    def __init__(
        self,
        cfg: MixtralConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, K, d] into flat slots [T]."""
        self.k[layer].view(-1, *k.shape[1:])[slots] = k
        self.v[layer].view(-1, *v.shape[1:])[slots] = v


@dataclass
class Allocation:
    blocks: list[int]
    cached_tokens: int  # prompt tokens whose KV was found in the prefix cache
    hashes: list[int]  # chain hashes of the prompt's full blocks (registered once computed)


class BlockPool:
    """Reference-counted blocks with an LRU of free ones and a prefix-hash index."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.block_of: dict[int, int] = {}  # prefix hash -> block
        self.hash_of: dict[int, int] = {}  # block -> prefix hash
        self.hits = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def prefix_hashes(self, prompt: list[int]) -> list[int]:
        """Chain hashes of the full blocks of prompt[:-1] (the last token is always recomputed)."""
        hashes, h = [], 0
        for start in range(0, len(prompt) - 1 - self.block_size + 1, self.block_size):
            h = hash((h, tuple(prompt[start : start + self.block_size])))
            hashes.append(h)
        return hashes

    def allocate(self, prompt: list[int], total_tokens: int, reuse: bool = True) -> Allocation | None:
        """Blocks for `total_tokens`, reusing cached prefix blocks unless `reuse` is off (the prompt's
        blocks are still registered once computed); None when the pool is too full."""
        hashes = self.prefix_hashes(prompt) if self.prefix_caching else []
        hits = []
        for h in hashes if reuse else ():
            if h not in self.block_of:
                break
            hits.append(self.block_of[h])
        need = self.blocks_needed(total_tokens) - len(hits)
        if self.num_free - sum(1 for b in hits if self.ref[b] == 0) < need:
            return None
        for b in hits:
            self._take(b)
        fresh = [self._evict_lru() for _ in range(need)]
        self.hits += len(hits)
        return Allocation(hits + fresh, len(hits) * self.block_size, hashes)

    def register(self, block: int, h: int) -> None:
        """Mark a computed full prompt block as reusable under prefix hash `h`."""
        if self.prefix_caching and h not in self.block_of and block not in self.hash_of:
            self.block_of[h], self.hash_of[block] = block, h

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None  # most recently freed last: evicted last

    def _take(self, b: int) -> None:
        if self.ref[b] == 0:
            del self.free[b]
        self.ref[b] += 1

    def _evict_lru(self) -> int:
        b, _ = self.free.popitem(last=False)
        h = self.hash_of.pop(b, None)
        if h is not None:
            del self.block_of[h]
        self.ref[b] = 1
        return b
