"""Batched token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

One call samples every sequence of an engine step at once: no Python loop over sequences or over
the vocabulary. Randomness is counter-based: the uniform noise for vocabulary entry v of a row is
a pure function of (seed, step, v) — SplitMix64 (Steele et al., "Fast splittable pseudorandom number
generators", 2014) evaluated with int64 tensor ops — so a request's tokens depend only on its seed
and its logits, never on which other requests share the batch, and no `torch.Generator` is kept per
row. The draw itself is the exponential race (Gumbel-max): argmax_v (logit_v / T + Gumbel_v) picks v
with probability softmax(logit / T)_v, restricted to the tokens that survive top-k and top-p.

Logprobs are the log-softmax of the raw logits (temperature 1, before top-k/top-p), as vLLM reports
them by default.

Shapes: B rows (sequences that sample this step), V vocabulary entries, N top logprobs per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # the OpenAI API's limit on top logprobs

_U64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples its tokens (the OpenAI/vLLM options that act on the sampler)."""

    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with this much probability (1 = off)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    seed: int | None = None  # same seed (and prompt) -> same tokens; None = a fresh random seed
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    stop_token_ids: tuple[int, ...] = ()  # token ids that end the sequence
    logprobs: int | None = None  # None = no logprobs; k = the chosen token's logprob plus the top k
    ignore_eos: bool = False  # keep generating past the end-of-sequence token

    def __post_init__(self) -> None:
        # Callers pass lists from JSON; keep the frozen dataclass hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        problems = [msg for msg, bad in self._checks() if bad]
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    def _checks(self) -> list[tuple[str, bool]]:
        return [
            (f"max_tokens must be at least 1, got {self.max_tokens}", self.max_tokens < 1),
            (f"temperature must be >= 0, got {self.temperature}", not self.temperature >= 0),
            (f"top_p must be in (0, 1], got {self.top_p}", not 0 < self.top_p <= 1),
            (f"top_k must be >= 0 (0 = off), got {self.top_k}", self.top_k < 0),
            (f"logprobs must be in 0..{MAX_LOGPROBS} or None, got {self.logprobs}",
             self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS),
            (f"seed must be an integer or None, got {self.seed!r}",
             self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool))),
            ("stop must hold non-empty strings", not all(isinstance(s, str) and s for s in self.stop)),
        ]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SamplingTensors:
    """The per-row sampling options of one step as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64, 0 = off
    seeds: torch.Tensor  # [B] int64 (the seed's low 64 bits, two's complement)
    steps: torch.Tensor  # [B] int64: index of the token being sampled within its request

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int],
                    device: torch.device | str = "cpu") -> SamplingTensors:
        if not len(params) == len(seeds) == len(steps):
            raise ValueError(f"params, seeds and steps differ in length: {len(params)}, {len(seeds)}, {len(steps)}")
        floats = torch.tensor([[p.temperature, p.top_p] for p in params], dtype=torch.float32).view(-1, 2)
        ints = torch.tensor([[p.top_k, _int64(s), _int64(t)] for p, s, t in zip(params, seeds, steps)],
                            dtype=torch.int64).view(-1, 3)
        floats, ints = floats.to(device), ints.to(device)
        return cls(floats[:, 0], floats[:, 1], ints[:, 0], ints[:, 1], ints[:, 2])

    def __len__(self) -> int:
        return int(self.temperature.shape[0])


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32: raw log-softmax at the chosen token
    top_ids: torch.Tensor  # [B, N] int64, best first
    top_logprobs: torch.Tensor  # [B, N] float32


def _int64(value: int) -> int:
    """A Python int's low 64 bits as a signed int64 (seeds may be any integer)."""
    value &= _U64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN_S, _MIX1_S, _MIX2_S = _int64(_GOLDEN), _int64(_MIX1), _int64(_MIX2)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic on signed ints)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer: a bijective avalanche of 64-bit patterns (int64 mul wraps mod 2^64)."""
    z = (z ^ _shr(z, 30)) * _MIX1_S
    z = (z ^ _shr(z, 27)) * _MIX2_S
    return z ^ _shr(z, 31)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """u[b, v] in (0, 1), a pure function of (seeds[b], steps[b], v): [B] x [B] -> [B, V] float32."""
    stream = _mix64(_mix64(seeds + _GOLDEN_S) + steps * _GOLDEN_S)  # [B]: one stream per (seed, step)
    counter = torch.arange(1, vocab + 1, dtype=torch.int64, device=seeds.device) * _GOLDEN_S  # [V]
    bits = _shr(_mix64(stream[:, None] + counter[None, :]), 40)  # [B, V]: top 24 bits
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _mask_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k largest logits (0 = all): [B, V] -> [B, V] with the rest at -inf."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # [B]
    kth = logits.topk(int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None])  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def _mask_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p: [B, V] -> [B, V]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V]: probability of the better tokens
    drop_sorted = (mass_before >= top_p[:, None]) & (top_p < 1)[:, None]  # the best token always stays
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _sample_random(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Temperature, top-k, top-p, then the Gumbel-max draw: [B, V] -> [B] int64."""
    scaled = logits / t.temperature[:, None]  # [B, V]
    if bool((t.top_k > 0).any()):
        scaled = _mask_top_k(scaled, t.top_k)
    if bool((t.top_p < 1).any()):
        scaled = _mask_top_p(scaled, t.top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(t.seeds, t.steps, logits.shape[-1])))  # [B, V]
    return (scaled + gumbel).argmax(dim=-1)


def _rows(t: SamplingTensors, rows: torch.Tensor) -> SamplingTensors:
    return SamplingTensors(t.temperature[rows], t.top_p[rows], t.top_k[rows], t.seeds[rows], t.steps[rows])


def _choose(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Greedy rows take the argmax; the others draw at random: [B, V] -> [B] int64."""
    token_ids = logits.argmax(dim=-1)  # [B]
    random_rows = (t.temperature > 0).nonzero().flatten()
    if random_rows.numel() == 0:
        return token_ids
    if random_rows.numel() == len(t):
        return _sample_random(logits, t)
    return token_ids.index_copy(0, random_rows, _sample_random(logits[random_rows], _rows(t, random_rows)))


def sample(logits: torch.Tensor, tensors: SamplingTensors, num_logprobs: int = 0) -> SampleOutput:
    """Sample one token per row of `logits` [B, V]; `num_logprobs` top alternatives per row (N)."""
    if logits.dim() != 2 or logits.shape[0] != len(tensors):
        raise ValueError(f"logits must be [B, V] with B = {len(tensors)} rows, got {tuple(logits.shape)}")
    logits = logits.float()
    token_ids = _choose(logits, tensors)  # [B]
    logprobs = logits.log_softmax(dim=-1)  # [B, V]: raw, temperature 1
    chosen = logprobs.gather(-1, token_ids[:, None]).squeeze(-1)  # [B]
    top_logprobs, top_ids = logprobs.topk(min(num_logprobs, logits.shape[-1]), dim=-1)  # [B, N]
    return SampleOutput(token_ids, chosen, top_ids, top_logprobs)
