"""Deterministic mode: a request's numbers do not depend on its neighbours nor on prefill chunking;
continuation requests (GenerateRequest.generated) resume a stream exactly."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moray.model.engine import AsyncEngine, EngineConfig, GenerateRequest, RequestError, TokenEvent
from moray.model.experts import ExpertBank, split_by_shard
from moray.model.invariant import ROW_TILE, InvariantAttention, RowTiler, _attend_tile, by_row_tiles
from moray.model.kv_cache import KVCache
from moray.model.layers import StepBatch, pack_linear, paged_attention
from moray.model.mixtral import Mixtral, load_local
from moray.model.sampling import SamplingParams
from moray.model.tokenizer import Tokenizer
from moray.model.weights import load_experts

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
SEEDED = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.95, seed=77, ignore_eos=True, logprobs=3)
PLAIN_SEEDED = SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True, logprobs=0)


def make_engine(ckpt: Path, deterministic: bool = True, **kw: object) -> AsyncEngine:
    model, experts = load_local(ckpt, deterministic=deterministic)
    fields = {"block_size": 4, "max_batch_tokens": 64, "max_model_len": 256, "deterministic": deterministic}
    cfg = EngineConfig(**{**fields, **kw})  # type: ignore[arg-type]
    return AsyncEngine(model, experts, Tokenizer.from_model_dir(ckpt), cfg)


async def run(engine: AsyncEngine, req: GenerateRequest) -> list[TokenEvent]:
    return [e async for e in engine.generate(req)]


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def numbers(events: list[TokenEvent]) -> list[tuple[int, float | None, object]]:
    """Token ids, logprobs and top logprobs: compared bit for bit (floats with ==)."""
    return [(e.token_id, e.logprob, e.top_logprobs) for e in events]


def chunked_logits(model: Mixtral, experts: object, tokens: list[int], chunks: list[int]) -> torch.Tensor:
    kv = KVCache(model.cfg, num_blocks=32, block_size=4, dtype=model.dtype, device=model.device)
    blocks = list(range(32))[::-1]
    out, start = [], 0
    for n in chunks:
        batch = StepBatch.for_sequence(tokens[start : start + n], start, blocks, 4, all_logits=True)
        out.append(asyncio.run(model.forward_step(batch.to(model.device), kv, experts)))  # type: ignore[arg-type]
        start += n
    return torch.cat(out)


def test_prefill_chunks_of_1_7_and_all_give_the_same_logits(tiny_dir: Path, device: torch.device) -> None:
    tokens = prompt(75, seed=1)  # past one attention key block (64)
    model, experts = load_local(tiny_dir, device=device, deterministic=True)
    whole = chunked_logits(model, experts, tokens, [75])
    assert torch.equal(chunked_logits(model, experts, tokens, [7] * 10 + [5]), whole)
    assert torch.equal(chunked_logits(model, experts, tokens, [1] * 75), whole)
    fast_model, fast_experts = load_local(tiny_dir, device=device)
    fast = chunked_logits(fast_model, fast_experts, tokens, [75])
    assert (whole - fast).abs().max().item() <= 1e-4  # the same model, summed in another order


@pytest.fixture(scope="module")
def requests() -> list[GenerateRequest]:
    """Greedy and seeded requests, and neighbours of other lengths (some longer than a prefill chunk)."""
    params = [GREEDY, SEEDED, PLAIN_SEEDED, GREEDY, SEEDED]
    lengths = [5, 33, 90, 2, 61]
    pairs = enumerate(zip(lengths, params, strict=True))
    return [GenerateRequest(prompt(n, seed=10 + i), p) for i, (n, p) in pairs]


@pytest.fixture(scope="module")
def alone(tiny_dir: Path, requests: list[GenerateRequest]) -> list[list[TokenEvent]]:
    engine = make_engine(tiny_dir, prefix_caching=False)
    return [asyncio.run(run(engine, r)) for r in requests]


def test_requests_alone_equal_batched_together(
    tiny_dir: Path, requests: list[GenerateRequest], alone: list[list[TokenEvent]]
) -> None:
    engine = make_engine(tiny_dir, max_batch_tokens=24)  # chunked prefills beside decodes

    async def together() -> list[list[TokenEvent]]:
        return await asyncio.gather(*(run(engine, r) for r in requests))

    got = asyncio.run(together())
    assert [numbers(g) for g in got] == [numbers(a) for a in alone]
    assert ["".join(e.text for e in g) for g in got] == ["".join(e.text for e in a) for a in alone]


def test_a_request_among_others_of_other_lengths_equals_alone(
    tiny_dir: Path, requests: list[GenerateRequest], alone: list[list[TokenEvent]]
) -> None:
    engine = make_engine(tiny_dir, pingpong=True, max_batch_tokens=40)
    others = [GenerateRequest(prompt(n, seed=50 + n), GREEDY) for n in (3, 17, 44, 70)]

    async def among(target: GenerateRequest) -> list[TokenEvent]:
        late = [run(engine, o) for o in others[2:]]
        got, *_ = await asyncio.gather(run(engine, target), *(run(engine, o) for o in others[:2]), *late)
        return got

    for r, expected in zip(requests[:3], alone[:3], strict=True):
        assert numbers(asyncio.run(among(r))) == numbers(expected)


@pytest.mark.parametrize("params", [GREEDY, SEEDED, PLAIN_SEEDED], ids=["greedy", "top-p", "seeded"])
@pytest.mark.parametrize("k", [1, 5, 11])
def test_continuation_produces_exactly_the_rest(tiny_dir: Path, params: SamplingParams, k: int) -> None:
    engine = make_engine(tiny_dir)
    tokens = prompt(40, seed=3)
    whole = asyncio.run(run(engine, GenerateRequest(tokens, params)))
    delivered = [e.token_id for e in whole[:k]]
    rest = asyncio.run(run(make_engine(tiny_dir), GenerateRequest(tokens, params, generated=delivered)))
    assert numbers(rest) == numbers(whole[k:])
    assert [e.text for e in rest] == [e.text for e in whole[k:]]
    last = rest[-1]  # usage counts the whole request once
    assert (last.prompt_tokens, last.completion_tokens) == (40, params.max_tokens)
    assert last.finish_reason == "length"


def test_stop_string_straddling_the_resume_point(tiny_dir: Path) -> None:
    engine = make_engine(tiny_dir)
    tokens = prompt(12, seed=8)
    base = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    free = asyncio.run(run(engine, GenerateRequest(tokens, base)))
    ends = [len("".join(e.text for e in free[: i + 1])) for i in range(len(free))]  # text after token i
    text = "".join(e.text for e in free)

    def straddles(i: int) -> bool:  # a 4-char stop string, 2 chars before the break after token i - 1
        b = ends[i - 1]
        return 2 <= b and b + 2 <= ends[i] and text.index(text[b - 2 : b + 2]) == b - 2

    k = next(i for i in range(3, len(free)) if straddles(i))
    stop = text[ends[k - 1] - 2 : ends[k - 1] + 2]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=(stop,))
    whole = asyncio.run(run(engine, GenerateRequest(tokens, params)))
    assert "".join(e.text for e in whole) == text[: text.index(stop)]
    delivered = whole[:k]
    resumed = GenerateRequest(tokens, params, generated=[e.token_id for e in delivered])
    rest = asyncio.run(run(engine, resumed))
    assert [(e.token_id, e.text, e.finish_reason) for e in rest] == [
        (e.token_id, e.text, e.finish_reason) for e in whole[k:]
    ]
    assert "".join(e.text for e in delivered + rest) == text[: text.index(stop)]
    assert rest[-1].finish_reason == "stop"


def test_continuation_that_cannot_continue(tiny_dir: Path) -> None:
    engine = make_engine(tiny_dir, deterministic=False)
    p = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    with pytest.raises(RequestError, match="already generated"):
        asyncio.run(run(engine, GenerateRequest([5, 6], p, generated=[7, 8, 9])))
    stopped = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(9,))
    with pytest.raises(RequestError, match="already end"):
        asyncio.run(run(engine, GenerateRequest([5, 6], stopped, generated=[7, 9])))


def test_engine_and_model_must_agree(tiny_dir: Path) -> None:
    model, experts = load_local(tiny_dir)
    with pytest.raises(ValueError, match="deterministic"):
        AsyncEngine(model, experts, Tokenizer.from_model_dir(tiny_dir), EngineConfig(deterministic=True))


def test_expert_bank_row_does_not_depend_on_its_companions(tiny_dir: Path) -> None:
    everything = {0: list(range(8))}
    tensors = load_experts(tiny_dir, everything).tensors
    bank = ExpertBank.from_weights(tensors, 0, range(8), 8, deterministic=True)
    fast = ExpertBank.from_weights(tensors, 0, range(8), 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 128, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(40)])  # [40, 2]
    ids[3, 1] = -1  # a slot served elsewhere
    gates = torch.rand(40, 2, generator=g)
    y = bank(x, ids, gates)
    assert (y - fast(x, ids, gates)).abs().max().item() <= 1e-5
    for rows in ([3], [0, 3, 7], list(range(3, 37))):
        assert torch.equal(bank(x[rows], ids[rows], gates[rows]), y[rows])


def test_row_tiler_rows_equal_whatever_the_row_count() -> None:
    """The expert down-projection's shape, where oneDNN computes 1 row unlike 2..256 (measured)."""
    tiles = RowTiler()
    weight = torch.randn(1024, 3584, generator=torch.Generator().manual_seed(1)) / 60
    packed = pack_linear(weight)
    x = torch.randn(40, 3584, generator=torch.Generator().manual_seed(2))
    whole = tiles.linear(x, packed)
    for rows in (slice(0, 1), slice(5, 6), slice(3, 10), slice(17, 40), slice(0, 33)):
        assert torch.equal(tiles.linear(x[rows], packed), whole[rows])
    assert (whole - F.linear(x, weight)).abs().max().item() < 1e-4


def test_row_tiler_pads_past_sizes_that_compute_differently() -> None:
    tiles = RowTiler(tile=8, max_call=8)

    def odd_alone(t: torch.Tensor) -> tuple[torch.Tensor]:  # a "kernel" that rounds otherwise for 1-2 rows
        return (t.sum(-1) + (1e-3 if t.shape[0] <= 2 else 0.0),)

    (y,) = tiles.run(("odd",), odd_alone, torch.ones(3, 5))
    assert tiles._sizes[("odd",)] == [4, 8]
    assert torch.equal(y, torch.full((3,), 5.0))
    (one,) = tiles.run(("odd",), odd_alone, torch.ones(1, 5))
    assert torch.equal(one, torch.full((1,), 5.0))


def test_deterministic_shards_add_up_to_one_bank_bit_for_bit(tiny_dir: Path) -> None:
    """Top-2 with the experts on 3 shards, partial outputs added back as the dispatcher does
    (`index_add_` into zeros): the same bits as every expert in one bank."""
    everything = {1: list(range(8))}
    tensors = load_experts(tiny_dir, everything).tensors
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 128, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(30)])
    gates = torch.softmax(torch.randn(30, 2, generator=g), -1)
    owner = torch.tensor([e % 3 for e in range(8)])
    y = torch.zeros_like(x)
    for s, (rows, sid, sg) in enumerate(split_by_shard(ids, gates, owner[ids], 3)):
        held = [e for e in range(8) if e % 3 == s]
        bank = ExpertBank.from_weights(tensors, 1, held, 8, deterministic=True)
        y.index_add_(0, rows, bank(x[rows], sid, sg))
    whole = ExpertBank.from_weights(tensors, 1, range(8), 8, deterministic=True)
    assert torch.equal(y, whole(x, ids, gates))


def test_invariant_attention_padded_and_unpadded_tiles_agree() -> None:
    """The CPU path (unpadded chunks, after its probe) and the padded ROW_TILE path used elsewhere give
    the same bits, and both the eager attention's values."""
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(64, 4, 2, 16, generator=g)  # [blocks, bs, K, d]
    vc = torch.randn(64, 4, 2, 16, generator=g)
    prefill = StepBatch.for_sequence(list(range(70)), 0, list(range(18)), 4)
    decode = StepBatch.for_sequence([5], 150, list(range(18, 56)), 4)
    attend = InvariantAttention()
    for batch in (prefill, decode):
        q = torch.randn(batch.tokens.shape[0], 4, 16, generator=g)  # [T, H, d]
        tables = batch.block_tables[batch.seq_index]

        def one(q: torch.Tensor, pos: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor]:
            return (_attend_tile(q, pos, tables, kc, vc),)

        (padded,) = by_row_tiles(one, q, batch.positions, tables, tile=ROW_TILE, pad=True)
        assert torch.equal(attend(q, kc, vc, batch), padded)
        assert (padded - paged_attention(q, kc, vc, batch)).abs().max().item() <= 1e-5
    assert len(attend._unpadded) == 1  # probed once (True here: the fast path; False falls back to tiles)


def test_prompt_logprobs_do_not_depend_on_chunks_nor_neighbours(tiny_dir: Path) -> None:
    """Prompt scores bit for bit: prefilled whole and alone, or in chunks of 7 beside other requests."""
    scored = GenerateRequest(prompt(40, seed=9), replace(GREEDY, max_tokens=2, prompt_logprobs=4))
    alone = asyncio.run(run(make_engine(tiny_dir), scored))
    engine = make_engine(tiny_dir, max_batch_tokens=7)

    async def among() -> list[TokenEvent]:
        others = [run(engine, GenerateRequest(prompt(n, seed=n), GREEDY)) for n in (5, 13)]
        got, *_ = await asyncio.gather(run(engine, scored), *others)
        return got

    got = asyncio.run(among())
    assert alone[0].prompt_logprobs is not None and len(alone[0].prompt_logprobs) == 39
    assert got[0].prompt_logprobs == alone[0].prompt_logprobs
    assert numbers(got) == numbers(alone)
