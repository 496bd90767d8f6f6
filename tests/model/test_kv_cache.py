"""The paged KV cache's block pool: reference counts, prefix hashes, LRU eviction, and the slot writes.

Oracles: block counts worked out by hand; a prefix hash recomputed here as a chain over the
prompt's full blocks (the last prompt token excluded); the pool's invariant that a block is free
exactly when its reference count is zero.
"""

from __future__ import annotations

import torch

from moray.model.config import MixtralConfig
from moray.model.kv_cache import BlockPool, KVCache

BLOCK = 4


def check_invariant(pool: BlockPool) -> None:
    """A block is free exactly when nothing references it; every indexed hash points both ways."""
    assert all((pool.ref[b] == 0) == (b in pool.free) for b in range(pool.num_blocks))
    assert pool.num_used + pool.num_free == pool.num_blocks
    assert all(pool.hash_of[b] == h for h, b in pool.block_of.items())


def register_all(pool: BlockPool, blocks: list[int], hashes: list[int]) -> None:
    for block, h in zip(blocks, hashes, strict=False):  # full prompt blocks come first
        pool.register(block, h)


def test_prefix_hashes_chain_over_full_blocks_without_the_last_token() -> None:
    pool = BlockPool(8, BLOCK)
    prompt = list(range(10, 19))  # 9 tokens: prompt[:-1] holds two full blocks
    h0 = hash((0, tuple(prompt[0:4])))
    assert pool.prefix_hashes(prompt) == [h0, hash((h0, tuple(prompt[4:8])))]
    assert pool.prefix_hashes(prompt[:8]) == [h0]  # 8 tokens: the last one is recomputed, one block
    assert pool.prefix_hashes(prompt[:4]) == []
    other = [99, *prompt[1:]]
    assert pool.prefix_hashes(other)[1] != pool.prefix_hashes(prompt)[1]  # chained: a change upstream


def test_allocation_counts_blocks_for_the_whole_budget() -> None:
    pool = BlockPool(8, BLOCK)
    alloc = pool.allocate(list(range(6)), total_tokens=6 + 5)  # 11 tokens -> 3 blocks
    assert alloc is not None and len(alloc.blocks) == 3 and alloc.cached_tokens == 0
    assert pool.num_used == 3 and all(pool.ref[b] == 1 for b in alloc.blocks)
    assert pool.allocate(list(range(30)), total_tokens=30) is None  # 8 blocks needed, 5 free
    assert pool.num_used == 3  # a refused allocation takes nothing
    check_invariant(pool)


def test_shared_prefix_blocks_are_reference_counted() -> None:
    pool = BlockPool(8, BLOCK)
    prompt = list(range(100, 109))  # two full prefix blocks
    first = pool.allocate(prompt, total_tokens=12)
    assert first is not None
    register_all(pool, first.blocks, first.hashes)
    second = pool.allocate(prompt, total_tokens=12)
    assert second is not None
    assert second.blocks[:2] == first.blocks[:2] and second.cached_tokens == 2 * BLOCK
    assert [pool.ref[b] for b in first.blocks[:2]] == [2, 2] and pool.hits == 2
    assert second.blocks[2] != first.blocks[2]  # the rest is private
    pool.release(first.blocks)
    assert [pool.ref[b] for b in second.blocks[:2]] == [1, 1]  # still held by the second
    assert first.blocks[2] in pool.free
    pool.release(second.blocks)
    assert pool.num_free == pool.num_blocks
    check_invariant(pool)


def test_freed_prefix_blocks_stay_cached_until_evicted_lru() -> None:
    pool = BlockPool(4, BLOCK)
    prompt = list(range(9))
    alloc = pool.allocate(prompt, total_tokens=9)  # 3 blocks, 2 of them full prefix blocks
    assert alloc is not None
    register_all(pool, alloc.blocks, alloc.hashes)
    pool.release(alloc.blocks)
    again = pool.allocate(prompt, total_tokens=9)  # all free, yet the prefix is found
    assert again is not None and again.cached_tokens == 2 * BLOCK
    pool.release(again.blocks)
    # A 16-token request needs every block: the cached ones are evicted and unindexed.
    big = pool.allocate(list(range(50, 66)), total_tokens=16)
    assert big is not None and sorted(big.blocks) == [0, 1, 2, 3]
    assert pool.block_of == {} and pool.hash_of == {}
    check_invariant(pool)


def test_eviction_takes_the_least_recently_freed_block_first() -> None:
    pool = BlockPool(3, BLOCK)
    a, b = pool.allocate([1], total_tokens=1), pool.allocate([2], total_tokens=1)
    assert a is not None and b is not None
    pool.release(b.blocks)
    pool.release(a.blocks)  # freed last: evicted last
    c = pool.allocate([3], total_tokens=2 * BLOCK)
    assert c is not None and c.blocks[0] != a.blocks[0]
    assert c.blocks == [2, b.blocks[0]]  # the never-used block, then the one freed first


def test_prefix_caching_off_never_reuses() -> None:
    pool = BlockPool(8, BLOCK, prefix_caching=False)
    prompt = list(range(9))
    first = pool.allocate(prompt, total_tokens=9)
    assert first is not None and first.hashes == []
    pool.register(first.blocks[0], 1234)
    assert pool.block_of == {}
    second = pool.allocate(prompt, total_tokens=9)
    assert second is not None and second.cached_tokens == 0 and not set(first.blocks) & set(second.blocks)


def test_register_keeps_the_first_block_for_a_hash() -> None:
    pool = BlockPool(4, BLOCK)
    pool.register(0, 7)
    pool.register(1, 7)  # same prefix computed twice: the index keeps the first
    pool.register(0, 8)  # a block holds one prefix
    assert pool.block_of == {7: 0} and pool.hash_of == {0: 7}


def test_cache_writes_land_in_their_slots() -> None:
    cfg = MixtralConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                        hidden_dim=32, n_experts=4)
    cache = KVCache(cfg, num_blocks=3, block_size=BLOCK, dtype=torch.float32, device="cpu")
    assert cache.k.shape == (2, 3, BLOCK, 1, cfg.head_dim)  # [layers, blocks, block_size, K, d]
    slots = torch.tensor([5, 0, 11])  # block 1 offset 1, block 0 offset 0, block 2 offset 3
    k = torch.arange(3 * cfg.head_dim, dtype=torch.float32).view(3, 1, cfg.head_dim)  # [T, K, d]
    cache.write(1, slots, k, -k)
    assert torch.equal(cache.k[1, 1, 1], k[0]) and torch.equal(cache.k[1, 0, 0], k[1])
    assert torch.equal(cache.v[1, 2, 3], -k[2])
    assert cache.k[0].abs().sum() == 0  # other layers untouched
