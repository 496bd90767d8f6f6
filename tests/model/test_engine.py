"""The in-process engine: batching equals alone, ping-pong, prefix cache, stop strings, cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from moray.model.engine import (
    AsyncEngine,
    EngineConfig,
    GenerateRequest,
    QueueFullError,
    RequestError,
    TokenEvent,
)
from moray.model.mixtral import load_local
from moray.model.sampling import SamplingParams
from moray.model.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=1)


def make_engine(ckpt: Path, **kw: object) -> AsyncEngine:
    model, experts = load_local(ckpt)
    cfg = EngineConfig(**{"block_size": 4, "max_batch_tokens": 64, "max_model_len": 256, **kw})  # type: ignore[arg-type]
    return AsyncEngine(model, experts, Tokenizer.from_model_dir(ckpt), cfg)


async def run(engine: AsyncEngine, req: GenerateRequest) -> list[TokenEvent]:
    return [e async for e in engine.generate(req)]


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 32000, (int(torch.randint(2, 70, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def ids(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events]


@pytest.fixture(scope="module")
def alone(tiny_dir: Path) -> list[list[int]]:
    engine = make_engine(tiny_dir, prefix_caching=False)
    return [ids(asyncio.run(run(engine, GenerateRequest(p, GREEDY)))) for p in prompts(6)]


@pytest.mark.parametrize("pingpong", [False, True])
def test_concurrent_chunked_batches_equal_alone(
    tiny_dir: Path, alone: list[list[int]], pingpong: bool
) -> None:
    """Chunked prefill (max_batch_tokens 64 < the longest prompts) + decodes, all at once."""
    engine = make_engine(tiny_dir, pingpong=pingpong, max_batch_tokens=24)

    async def together() -> list[list[TokenEvent]]:
        return await asyncio.gather(*(run(engine, GenerateRequest(p, GREEDY)) for p in prompts(6)))

    assert [ids(r) for r in asyncio.run(together())] == alone
    assert engine.stats()["kv_blocks_used"] == 0


def test_prefix_cache_hit_equals_miss(tiny_dir: Path) -> None:
    system = prompts(1, seed=3)[0] * 2  # a long shared prefix
    reqs = [GenerateRequest(system + tail, GREEDY) for tail in ([11, 12, 13], [21, 22])]
    cold = [ids(asyncio.run(run(make_engine(tiny_dir, prefix_caching=False), r))) for r in reqs]
    engine = make_engine(tiny_dir)
    warm = [ids(asyncio.run(run(engine, r))) for r in reqs]
    assert engine.stats()["prefix_cache_hits"] >= len(system) // 4 - 1
    assert warm == cold


def test_seeded_sampling_is_reproducible_across_batches(tiny_dir: Path) -> None:
    engine = make_engine(tiny_dir)
    p = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    first = ids(asyncio.run(run(engine, GenerateRequest(prompts(1)[0], p))))

    async def with_neighbours() -> list[list[TokenEvent]]:
        others = [run(engine, GenerateRequest(q, GREEDY)) for q in prompts(3, seed=5)]
        return await asyncio.gather(run(engine, GenerateRequest(prompts(1)[0], p)), *others)

    assert ids(asyncio.run(with_neighbours())[0]) == first


def test_stop_string_cuts_text_and_streams_consistently(tiny_dir: Path) -> None:
    engine = make_engine(tiny_dir)
    prompt = prompts(1, seed=8)[0]
    full = asyncio.run(
        run(engine, GenerateRequest(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)))
    )
    text = "".join(e.text for e in full)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop, "the tiny model must produce some text"
    cut = asyncio.run(
        run(
            engine,
            GenerateRequest(
                prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop,))
            ),
        )
    )
    assert "".join(e.text for e in cut) == text[: text.index(stop)]
    assert cut[-1].finish_reason == "stop"
    assert len(cut) < len(full)


def test_requests_that_cannot_fit(tiny_dir: Path) -> None:
    engine = make_engine(tiny_dir, max_waiting=0)
    with pytest.raises(RequestError, match="maximum context length is 256"):
        asyncio.run(run(engine, GenerateRequest(list(range(5, 300)), GREEDY)))
    with pytest.raises(RequestError, match="empty"):
        asyncio.run(run(engine, GenerateRequest([], GREEDY)))
    with pytest.raises(QueueFullError):
        asyncio.run(run(engine, GenerateRequest([5, 6], GREEDY)))


def test_cancelled_stream_frees_its_blocks(tiny_dir: Path) -> None:
    engine = make_engine(tiny_dir)

    async def cancel_midway() -> None:
        agen = engine.generate(GenerateRequest([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True)))
        for _ in range(3):
            await agen.__anext__()
        assert engine.stats()["kv_blocks_used"] > 0
        await agen.aclose()

    asyncio.run(cancel_midway())
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0


def test_prompt_logprobs_skip_the_prefix_cache(tiny_dir: Path) -> None:
    """A request that scores its prompt computes every position, even one whose blocks are cached, and
    gets what an engine without a prefix cache gives; a continuation does not score it again."""
    tokens = prompts(1, seed=3)[0] * 2
    scored = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=2)

    def first_scores(engine: AsyncEngine, req: GenerateRequest) -> list[object]:
        return asyncio.run(run(engine, req))[0].prompt_logprobs  # type: ignore[return-value]

    cold = first_scores(make_engine(tiny_dir, prefix_caching=False), GenerateRequest(tokens, scored))
    engine = make_engine(tiny_dir)
    asyncio.run(run(engine, GenerateRequest(tokens, GREEDY)))  # fills the cache with this prompt
    hits = engine.stats()["prefix_cache_hits"]
    warm = first_scores(engine, GenerateRequest(tokens, scored))
    assert engine.stats()["prefix_cache_hits"] == hits
    assert len(cold) == len(tokens) - 1 and warm == cold
    resumed = asyncio.run(run(engine, GenerateRequest(tokens, scored, generated=[5])))
    assert [e.prompt_logprobs for e in resumed] == [None, None]
