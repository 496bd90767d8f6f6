"""Sampler: greedy, seeds, batch independence, and the top-k / top-p distributions checked statistically.

Oracles: torch's argmax / log_softmax, and the nucleus and top-k sets computed here with numpy from
the definition (sort, smallest prefix reaching p), independent of the sampler's code paths.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moray.model.sampling import SamplingParams, SamplingTensors, sample

DRAWS = 20000  # rows per statistical check: a binomial frequency's sigma is at most 0.0036


def draw(logits: torch.Tensor, params: SamplingParams, n: int = DRAWS, step: int = 0) -> np.ndarray:
    """n draws from one logits vector [V]: n rows with seeds 0..n-1 -> token ids [n]."""
    batch = logits[None, :].expand(n, -1).contiguous()
    t = SamplingTensors.from_params([params] * n, list(range(n)), [step] * n, logits.device)
    return sample(batch, t).token_ids.cpu().numpy()


def assert_matches(tokens: np.ndarray, probs: np.ndarray, sigmas: float = 5.0) -> None:
    """Empirical frequencies within `sigmas` binomial standard deviations of `probs` [V]."""
    freq = np.bincount(tokens, minlength=len(probs)) / len(tokens)
    sigma = np.sqrt(probs * (1 - probs) / len(tokens)) + 1e-12
    worst = np.max(np.abs(freq - probs) / sigma)
    assert worst < sigmas, f"frequencies {freq.round(4)} vs expected {probs.round(4)}: {worst:.1f} sigma"


def nucleus(probs: np.ndarray, p: float) -> np.ndarray:
    """Indices of the smallest set of most likely tokens whose mass reaches p."""
    order = np.argsort(-probs, kind="stable")
    mass = np.cumsum(probs[order])
    return order[: int(np.searchsorted(mass, p - 1e-12)) + 1]


def renormalized(probs: np.ndarray, keep: np.ndarray) -> np.ndarray:
    out = np.zeros_like(probs)
    out[keep] = probs[keep] / probs[keep].sum()
    return out


def softmax(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(logits.double() / temperature, dim=-1).cpu().numpy()


@pytest.fixture
def small_logits(device: torch.device) -> torch.Tensor:
    return torch.tensor([2.0, 1.5, 1.2, 1.0, 0.5, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0, 0.8], device=device)


# ---- parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"seed": 1.5}, "seed"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_invalid_params_raise(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_params_are_frozen_and_hashable() -> None:
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[5])  # type: ignore[arg-type]
    assert p.stop == ("a", "b") and p.stop_token_ids == (5,)
    assert hash(p) == hash(SamplingParams(stop=("a", "b"), stop_token_ids=(5,)))
    with pytest.raises(AttributeError):
        p.temperature = 0.5  # type: ignore[misc]


# ---- greedy and determinism ---------------------------------------------------------------------
def test_temperature_zero_is_argmax(device: torch.device) -> None:
    logits = torch.randn(16, 32000, generator=torch.Generator().manual_seed(0)).to(device)
    t = SamplingTensors.from_params([SamplingParams(temperature=0.0)] * 16, range(16), [3] * 16, device)
    assert torch.equal(sample(logits, t).token_ids, logits.argmax(dim=-1))


def test_top_k_one_equals_greedy(device: torch.device) -> None:
    logits = torch.randn(64, 32000, generator=torch.Generator().manual_seed(1)).to(device)
    params = [SamplingParams(temperature=1.7, top_k=1)] * 64
    t = SamplingTensors.from_params(params, range(64), [0] * 64, device)
    assert torch.equal(sample(logits, t).token_ids, logits.argmax(dim=-1))


def mixed_batch(n: int) -> list[SamplingParams]:
    kinds = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_p=0.8),
        SamplingParams(top_k=20),
        SamplingParams(temperature=1.3, top_k=50, top_p=0.9),
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


def test_same_seed_same_token_whatever_the_batch(device: torch.device) -> None:
    g = torch.Generator().manual_seed(2)
    n = 40
    logits = (torch.randn(n, 32000, generator=g) * 3).to(device)
    params, seeds, steps = mixed_batch(n), [1000 + 7 * i for i in range(n)], [i % 5 for i in range(n)]
    together = sample(logits, SamplingTensors.from_params(params, seeds, steps, device)).token_ids
    perm = torch.randperm(n, generator=g).tolist()
    shuffled = sample(
        logits[perm],
        SamplingTensors.from_params(
            [params[i] for i in perm], [seeds[i] for i in perm], [steps[i] for i in perm], device
        ),
    ).token_ids
    assert torch.equal(shuffled, together[perm])
    for i in range(0, n, 3):  # alone, and beside other rows
        one = SamplingTensors.from_params([params[i]], [seeds[i]], [steps[i]], device)
        alone = sample(logits[i : i + 1], one)
        assert int(alone.token_ids[0]) == int(together[i]), f"row {i} ({params[i]})"


def test_seeds_and_steps_change_the_draw(device: torch.device) -> None:
    logits = torch.zeros(32000, device=device)  # uniform: any coupling between draws would show
    by_seed = draw(logits, SamplingParams(), n=500)
    assert len(set(by_seed.tolist())) > 490
    batch = logits[None].expand(500, -1)
    same_seed = SamplingTensors.from_params([SamplingParams()] * 500, [7] * 500, range(500), device)
    by_step = sample(batch, same_seed)
    assert len(set(by_step.token_ids.tolist())) > 490
    assert not np.array_equal(by_seed, draw(logits, SamplingParams(), n=500, step=1))


def test_seeds_wrap_to_64_bits(device: torch.device) -> None:
    logits = torch.zeros(1, 32000, device=device)
    p = [SamplingParams()]
    tokens = [
        int(sample(logits, SamplingTensors.from_params(p, [s], [0], device)).token_ids[0])
        for s in (-1, 2**64 - 1, 2**128 - 1)
    ]
    assert len(set(tokens)) == 1


# ---- distributions ------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_temperature_distribution(small_logits: torch.Tensor, temperature: float) -> None:
    tokens = draw(small_logits, SamplingParams(temperature=temperature))
    assert_matches(tokens, softmax(small_logits, temperature))


@pytest.mark.parametrize("top_p", [0.5, 0.75, 0.9])
def test_top_p_distribution(small_logits: torch.Tensor, top_p: float) -> None:
    probs = softmax(small_logits, 0.8)
    keep = nucleus(probs, top_p)
    tokens = draw(small_logits, SamplingParams(temperature=0.8, top_p=top_p))
    assert set(tokens.tolist()) == set(keep.tolist())  # every nucleus token appears, no other ever does
    assert_matches(tokens, renormalized(probs, keep))


@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_top_k_distribution(small_logits: torch.Tensor, top_k: int) -> None:
    probs = softmax(small_logits, 1.2)
    keep = np.argsort(-probs)[:top_k]
    tokens = draw(small_logits, SamplingParams(temperature=1.2, top_k=top_k))
    assert set(tokens.tolist()) == set(keep.tolist())
    assert_matches(tokens, renormalized(probs, keep))


def test_top_k_then_top_p(small_logits: torch.Tensor) -> None:
    """vLLM's order: top-p applies to the top-k-renormalized distribution."""
    probs = softmax(small_logits)
    top5 = renormalized(probs, np.argsort(-probs)[:5])
    keep = nucleus(top5, 0.6)
    tokens = draw(small_logits, SamplingParams(top_k=5, top_p=0.6))
    assert set(tokens.tolist()) == set(keep.tolist())
    assert_matches(tokens, renormalized(top5, keep))


@pytest.mark.parametrize("spread", [6.0, 1.0])  # peaky: nucleus among the best few; flat: a full sort
def test_top_p_on_a_large_vocab(device: torch.device, spread: float) -> None:
    logits = (torch.randn(4096, generator=torch.Generator().manual_seed(3)) * spread).to(device)
    probs = softmax(logits)
    keep = nucleus(probs, 0.9)
    tokens = draw(logits, SamplingParams(top_p=0.9), n=4000)
    assert set(tokens.tolist()) <= set(keep.tolist())
    best = keep[:5]  # the most likely tokens' frequencies
    freq = np.array([(tokens == b).mean() for b in best])
    expected = probs[best] / probs[keep].sum()
    assert np.all(np.abs(freq - expected) < 5 * np.sqrt(expected / 4000) + 1e-3), (freq, expected)


# ---- logprobs -----------------------------------------------------------------------------------
def test_logprobs_are_raw_log_softmax(device: torch.device) -> None:
    logits = (torch.randn(6, 32000, generator=torch.Generator().manual_seed(4)) * 2).to(device)
    params, before = mixed_batch(6), logits.clone()
    out = sample(logits, SamplingTensors.from_params(params, range(6), [0] * 6, device), num_logprobs=4)
    assert torch.equal(logits, before)  # the caller's logits are left alone
    reference = torch.log_softmax(logits.double(), dim=-1)
    chosen = reference.gather(-1, out.token_ids[:, None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs.double(), chosen, atol=1e-5, rtol=0)
    values, ids = reference.sort(dim=-1, descending=True)
    assert torch.equal(out.top_ids, ids[:, :4])
    torch.testing.assert_close(out.top_logprobs.double(), values[:, :4], atol=1e-5, rtol=0)
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32


def test_no_logprobs_requested_gives_empty_top(device: torch.device) -> None:
    logits = torch.randn(3, 100, device=device)
    out = sample(logits, SamplingTensors.from_params([SamplingParams()] * 3, [1, 2, 3], [0] * 3, device))
    assert out.top_ids.shape == (3, 0) and out.top_logprobs.shape == (3, 0)
    assert torch.isfinite(out.logprobs).all() and bool((out.logprobs <= 0).all())


def test_half_precision_logits(device: torch.device) -> None:
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(5)).to(device, torch.bfloat16)
    t = SamplingTensors.from_params(mixed_batch(4), range(4), [0] * 4, device)
    out = sample(logits, t, num_logprobs=2)
    assert out.logprobs.dtype == torch.float32 and not math.isnan(float(out.logprobs.sum()))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="rows"):
        sample(torch.zeros(2, 10), SamplingTensors.from_params([SamplingParams()], [0], [0]))
