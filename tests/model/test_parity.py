"""Numerical parity with transformers' MixtralForCausalLM on the same checkpoint directory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from moray.model.engine import AsyncEngine, EngineConfig, GenerateRequest, TokenEvent
from moray.model.kernels import Kernels, candidates
from moray.model.kv_cache import KVCache
from moray.model.layers import StepBatch
from moray.model.mixtral import load_local
from moray.model.sampling import SamplingParams
from moray.model.tiny import TinySpec, make_tiny
from moray.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SPECS = {
    "8experts-gqa4": TinySpec(layers=2, dim=64, heads=8, kv_heads=2, experts=8, hidden=96, seed=11),
    "4experts-mha": TinySpec(layers=3, dim=64, heads=4, kv_heads=4, experts=4, hidden=80, seed=12),
}


@pytest.fixture(scope="module", params=list(SPECS))
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp(request.param), SPECS[request.param])


def hf_model(path: Path) -> torch.nn.Module:
    return transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def full_logits(path: Path, tokens: list[int], chunks: list[int], kernel: str | None = None) -> torch.Tensor:
    """Our logits at every position, feeding `tokens` in the given chunk sizes through the KV cache
    (`kernel`: forced for every linear, else the default one)."""
    model, experts = load_local(path, kernels=Kernels(force=kernel) if kernel else None)
    kv = KVCache(model.cfg, num_blocks=8, block_size=4, dtype=torch.float32, device="cpu")
    blocks = [5, 2, 7, 0, 1, 3, 6, 4]  # deliberately out of order
    out, start = [], 0
    for n in chunks:
        batch = StepBatch.for_sequence(tokens[start : start + n], start, blocks, 4, all_logits=True)
        out.append(asyncio.run(model.forward_step(batch, kv, experts)))
        start += n
    return torch.cat(out)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kernel", candidates(False, torch.float32))
def test_full_sequence_logits_match_transformers(ckpt: Path, kernel: str) -> None:
    """With each kernel the probe can choose for fp32 here (model/kernels.py)."""
    tokens = prompt(19)
    with torch.no_grad():
        expected = hf_model(ckpt)(torch.tensor([tokens])).logits[0]
    ours = full_logits(ckpt, tokens, [len(tokens)], kernel)
    assert (ours - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kernel", candidates(False, torch.float32))
def test_prefill_then_decode_equals_one_forward(ckpt: Path, kernel: str) -> None:
    tokens = prompt(17, seed=1)
    once = full_logits(ckpt, tokens, [17], kernel)
    stepwise = full_logits(ckpt, tokens, [6, 5] + [1] * 6, kernel)
    assert (once - stepwise).abs().max().item() <= 1e-5


def test_greedy_tokens_match_transformers_generate(ckpt: Path) -> None:
    tokens = prompt(9, seed=2)
    with torch.no_grad():
        hf = (
            hf_model(ckpt)
            .generate(torch.tensor([tokens]), max_new_tokens=16, do_sample=False, min_new_tokens=16)[
                0, len(tokens) :
            ]
            .tolist()
        )
    model, experts = load_local(ckpt)
    engine = AsyncEngine(model, experts, Tokenizer.from_model_dir(ckpt), EngineConfig(block_size=4))
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    async def run() -> list[int]:
        return [e.token_id async for e in engine.generate(GenerateRequest(tokens, params))]

    assert asyncio.run(run()) == hf


def test_prompt_logprobs_equal_transformers_log_softmax(ckpt: Path) -> None:
    """The engine's prompt scores, prefilled in chunks of 8 beside another request, against transformers:
    each token's log-softmax, its rank in the vocabulary and the top 3 at its position."""
    tokens = prompt(23, seed=3)
    with torch.no_grad():
        expected = torch.log_softmax(hf_model(ckpt)(torch.tensor([tokens])).logits[0, :-1].float(), dim=-1)
    model, experts = load_local(ckpt)
    engine = AsyncEngine(model, experts, Tokenizer.from_model_dir(ckpt),
                         EngineConfig(block_size=4, max_batch_tokens=8))
    scored = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    other = SamplingParams(max_tokens=4, temperature=0.0)

    async def events_of(request: GenerateRequest) -> list[TokenEvent]:
        return [e async for e in engine.generate(request)]

    async def run() -> list[list[TokenEvent]]:
        requests = [GenerateRequest(tokens, scored), GenerateRequest(prompt(11, seed=4), other)]
        return await asyncio.gather(*(events_of(r) for r in requests))

    events, _ = asyncio.run(run())
    scores = events[0].prompt_logprobs
    assert scores is not None and [s.token_id for s in scores] == tokens[1:]
    assert all(e.prompt_logprobs is None for e in events[1:])
    target = torch.tensor(tokens[1:])
    want = expected.gather(-1, target[:, None]).squeeze(-1)
    assert torch.tensor([s.logprob for s in scores]).sub(want).abs().max().item() <= 1e-4
    assert [s.rank for s in scores] == ((expected > want[:, None]).sum(-1) + 1).tolist()
    top, top_ids = expected.topk(3, dim=-1)
    assert [[t for t, _ in s.top_logprobs] for s in scores] == top_ids.tolist()
    assert torch.tensor([[lp for _, lp in s.top_logprobs] for s in scores]).sub(top).abs().max() <= 1e-4
