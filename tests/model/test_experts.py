"""ExpertBank (grouped) against the loop MoE reference, and the shard split helper."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moray.model import experts as experts_module
from moray.model.experts import ExpertBank, LocalExperts, reference_moe, split_by_shard


def random_experts(layer: int, experts: int, dim: int, hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(experts):
        for w, shape in (("w1", (hidden, dim)), ("w3", (hidden, dim)), ("w2", (dim, hidden))):
            out[f"layers.{layer}.experts.{e}.{w}"] = torch.randn(shape, generator=g) / shape[1] ** 0.5
    return out


def test_grouped_bank_equals_loop_reference() -> None:
    weights = random_experts(0, 8, 32, 48)
    x = torch.randn(37, 32)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(37)])
    gates = torch.softmax(torch.randn(37, 2), -1)
    bank = ExpertBank.from_weights(weights, 0, range(8), 8)
    torch.testing.assert_close(
        bank(x, ids, gates), reference_moe(x, ids, gates, weights, 0, 8), atol=1e-5, rtol=1e-5
    )


def test_shards_sum_to_the_whole() -> None:
    """Splitting tokens over shards holding disjoint experts and adding back equals one bank."""
    weights = random_experts(1, 8, 16, 24, seed=1)
    x, T = torch.randn(20, 16), 20
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(T)])
    gates = torch.softmax(torch.randn(T, 2), -1)
    owner = torch.tensor([e % 3 for e in range(8)])
    banks = [ExpertBank.from_weights(weights, 1, [e for e in range(8) if e % 3 == s], 8) for s in range(3)]
    y = torch.zeros_like(x)
    for s, (rows, sid, sg) in enumerate(split_by_shard(ids, gates, owner[ids], 3)):
        y.index_add_(0, rows, banks[s](x[rows], sid, sg))
    whole = LocalExperts({1: ExpertBank.from_weights(weights, 1, range(8), 8)})
    torch.testing.assert_close(y, whole.banks[1](x, ids, gates), atol=1e-5, rtol=1e-5)


def split_loop(ids: torch.Tensor, shard_of: torch.Tensor, shards: int) -> list[tuple[list[int], list[Any]]]:
    """The obvious per-token loop: each shard's rows (ascending) and their ids, -1 where not its own."""
    out = []
    for s in range(shards):
        rows = [t for t in range(len(ids)) if (shard_of[t] == s).any()]
        own = [[e if o == s else -1 for e, o in zip(ids[t].tolist(), shard_of[t].tolist(), strict=True)]
               for t in rows]
        out.append((rows, own))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_split_by_shard_equals_the_loop(seed: int) -> None:
    """Every shape the dispatcher meets: one token or many, top-1 or top-2, padding slots (id -1), a shard
    that gets every row, some rows or none, every slot of its rows or some."""
    g = torch.Generator().manual_seed(seed)
    tokens, slots, shards = (1, 2, 3, 17, 64, 5, 1, 40)[seed], 1 + seed % 2, 1 + seed % 4
    ids = torch.randint(0, 8, (tokens, slots), generator=g)
    ids[torch.rand(ids.shape, generator=g) < 0.15] = -1
    owner = torch.randint(0, shards, (8,), generator=g)
    shard_of = torch.where(ids >= 0, owner[ids.clamp(min=0)], -1)
    gates = torch.rand(tokens, slots, generator=g)
    parts = split_by_shard(ids, gates, shard_of, shards)
    assert len(parts) == shards
    for (rows, sid, sg), (want_rows, want_ids) in zip(parts, split_loop(ids, shard_of, shards), strict=True):
        assert rows.tolist() == want_rows and sid.tolist() == want_ids
        assert sid.dtype == torch.int64 and sid.shape == (len(want_rows), slots)
        assert torch.equal(sg, gates[rows]) and sg.dtype == gates.dtype
    before = [sid.clone() for _, sid, _ in parts]
    ids.fill_(5)  # the parts own their ids: the router's tensor changing later changes none of them
    assert all(torch.equal(b, sid) for b, (_, sid, _) in zip(before, parts, strict=True))


def test_padding_slots_contribute_nothing() -> None:
    weights = random_experts(0, 4, 8, 8, seed=2)
    bank = ExpertBank.from_weights(weights, 0, [1, 3], 4)
    x = torch.randn(3, 8)
    ids = torch.tensor([[1, -1], [-1, -1], [3, 1]])
    gates = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.6, 0.4]])
    y = bank(x, ids, gates)
    assert torch.all(y[1] == 0)
    torch.testing.assert_close(y, reference_moe(x, ids, gates, weights, 0, 4))


@pytest.mark.parametrize("seed", range(12))
def test_few_slots_give_the_grouped_numbers_bit_for_bit(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode of a row or two is grouped in Python (`_few`): the same bits as the sorted, grouped path,
    with padding slots, experts of another shard, both slots of a row on one expert, top-1 and top-2."""
    g = torch.Generator().manual_seed(seed)
    weights = random_experts(0, 6, 16, 24, seed=seed)
    bank = ExpertBank.from_weights(weights, 0, [0, 2, 3, 5], 6)
    rows, slots = 1 + seed % 3, 1 + seed % 2
    x = torch.randn(rows, 16, generator=g)
    ids = torch.randint(-1, 6, (rows, slots), generator=g)
    if seed == 11:
        ids[0] = 2  # the same expert twice in one row
    gates = torch.rand(rows, slots, generator=g)
    monkeypatch.setattr(experts_module, "FEW_SLOTS", rows * slots)
    few = bank(x, ids, gates)
    monkeypatch.setattr(experts_module, "FEW_SLOTS", 0)
    assert torch.equal(few, bank(x, ids, gates)), ids
    if seed != 11:  # the loop reference's `y[rows] +=` adds a repeated row once
        own = torch.where(torch.isin(ids, torch.tensor([0, 2, 3, 5])), ids, -1)
        torch.testing.assert_close(few, reference_moe(x, own, gates, weights, 0, 6))


def test_packed_linear_equals_f_linear_at_every_row_count() -> None:
    """`linear` on a `pack_linear` weight (oneDNN-packed on CPU) equals `F.linear`, rows padded or
    not, 2-D or 3-D, and zero rows."""
    from moray.model.layers import linear, pack_linear

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(96, 80, generator=gen)
    packed = pack_linear(w)
    for rows in (0, 1, 3, 16, 17, 64, 65, 130):
        x = torch.randn(rows, 80, generator=gen)
        torch.testing.assert_close(linear(x, packed), torch.nn.functional.linear(x, w), rtol=1e-4, atol=1e-4)
    x3 = torch.randn(2, 5, 80, generator=gen)
    torch.testing.assert_close(linear(x3, packed), torch.nn.functional.linear(x3, w), rtol=1e-4, atol=1e-4)


def test_row_buckets_are_few_and_never_double_large_batches() -> None:
    """oneDNN keeps a kernel (with its buffers) per row count: `linear` must see few distinct ones."""
    from moray.model.kernels import row_bucket

    buckets = {row_bucket(r) for r in range(1, 2049)}
    assert len(buckets) <= 40
    assert all(row_bucket(r) >= r for r in range(1, 2049))
    assert all(row_bucket(r) < r + 64 for r in range(65, 2049))
