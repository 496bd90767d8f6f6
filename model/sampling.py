"""Batched token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

One call samples every sequence of an engine step at once: no Python loop over sequences or over
the vocabulary. Randomness is counter-based: each row's uniform u is a pure function of (seed, step)
— SplitMix64 (Steele et al., "Fast splittable pseudorandom number generators", 2014) evaluated with
int64 tensor ops — so a request's tokens depend only on its seed and its logits, never on which other
requests share the batch, and no `torch.Generator` is kept per row. The draw is by inverse CDF: the
first token whose cumulative probability exceeds u. (A Gumbel-max race needs a hashed uniform per
vocabulary entry: measured ~20x the cost of the softmax and cumsum here, 56 ms for 32 x 32000 on
one core, for the same distribution and the same batch independence.)

Top-k and top-p work on candidates sorted best first: `topk` when every row has a top-k, else the
best `NUCLEUS_PREFIX` tokens when they hold every row's nucleus, else a full sort. Rows with neither
skip the sorting.

Logprobs are the log-softmax of the raw logits (temperature 1, before top-k/top-p), as vLLM reports
them by default.

Prompt logprobs (`score`) are the same log-softmax at each prompt position, taken at the prompt's
next token, with that token's rank in the vocabulary (1 = the most likely) and the top N.

Shapes: B rows (sequences that sample this step, or prompt positions scored), V vocabulary entries,
N top logprobs per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from moray.model.structured import Constraint

MAX_LOGPROBS = 20  # the OpenAI API's limit on top logprobs
NUCLEUS_PREFIX = 1024  # top-p first looks for the nucleus among this many best tokens (a full sort is slow)

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
    prompt_logprobs: int | None = None  # None = none; k = each prompt token's logprob, rank and the top k
    ignore_eos: bool = False  # keep generating past the end-of-sequence token
    constraint: Constraint | None = None  # the output must match this (structured.py); None = free text

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
            (
                f"logprobs must be in 0..{MAX_LOGPROBS} or None, got {self.logprobs}",
                self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS,
            ),
            (
                f"prompt_logprobs must be in 0..{MAX_LOGPROBS} or None, got {self.prompt_logprobs}",
                self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
            ),
            (
                f"seed must be an integer or None, got {self.seed!r}",
                self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)),
            ),
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
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> SamplingTensors:
        if not len(params) == len(seeds) == len(steps):
            lengths = f"{len(params)}, {len(seeds)}, {len(steps)}"
            raise ValueError(f"params, seeds and steps differ in length: {lengths}")
        floats = torch.tensor([[p.temperature, p.top_p] for p in params], dtype=torch.float32).view(-1, 2)
        rows = zip(params, seeds, steps, strict=True)
        ints = torch.tensor([[p.top_k, _int64(s), _int64(t)] for p, s, t in rows], dtype=torch.int64)
        ints = ints.view(-1, 3)
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


def uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """u[b] in (0, 1), a pure function of (seeds[b], steps[b]): [B] int64 x [B] int64 -> [B] float64."""
    bits = _shr(_mix64(_mix64(seeds + _GOLDEN_S) + steps * _GOLDEN_S), 11)  # [B]: 53 random bits
    return (bits.to(torch.float64) + 0.5) * 2.0**-53


def _draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from softmax(logits) [B, C] (-inf = excluded) with one uniform u [B] per row:
    the first position whose cumulative probability exceeds u, never an excluded (zero) entry.

    Consumes `logits` (overwritten in place): every fresh [B, V] buffer costs page faults on CPU.
    """
    cdf = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_().cumsum_(dim=-1)  # [B, C] unnormalized
    total = cdf[:, -1:]  # [B, 1]
    target = (u[:, None] * total.double()).float()
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))  # below the total
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


Candidates = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _candidates(scaled: torch.Tensor, t: SamplingTensors) -> Candidates:
    """Each row's best tokens, best first, enough for every row's top-k and top-p: values and ids
    [B, C], and the full-vocabulary logsumexp [B] that top-p needs for rows without top-k."""
    vocab = scaled.shape[-1]
    if bool((t.top_k > 0).all()):  # every row renormalizes over its own top-k: no full logsumexp
        best, ids = scaled.topk(int(t.top_k.max().clamp(max=vocab)), dim=-1)
        return best, ids, torch.zeros_like(best[:, 0])
    lse = scaled.logsumexp(dim=-1)  # [B]
    prefix = min(max(NUCLEUS_PREFIX, int(t.top_k.max())), vocab)
    if prefix < vocab:  # is every nucleus inside the prefix? (usually, for a trained model)
        best, ids = scaled.topk(prefix, dim=-1)
        mass = (best - lse[:, None]).exp().sum(dim=-1)  # [B]
        if bool(((t.top_k > 0) | (mass >= t.top_p)).all()):
            return best, ids, lse
    best, ids = scaled.sort(dim=-1, descending=True)
    return best, ids, lse


def _mask_sorted(best: torch.Tensor, lse: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Apply top-k, then top-p (on the top-k-renormalized distribution) to sorted candidates [B, C]."""
    position = torch.arange(best.shape[-1], device=best.device)  # [C]
    best = best.masked_fill((t.top_k[:, None] > 0) & (position[None, :] >= t.top_k[:, None]), float("-inf"))
    if not bool((t.top_p < 1).any()):
        return best
    lse = torch.where(t.top_k > 0, best.logsumexp(dim=-1), lse)  # [B]
    probs = (best - lse[:, None]).exp()  # [B, C]
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better candidates
    drop = (mass_before >= t.top_p[:, None]) & (t.top_p < 1)[:, None]  # the best token always stays
    return best.masked_fill_(drop, float("-inf"))


def _sample_filtered(scaled: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Rows with top-k and/or top-p: draw among the sorted survivors: [B, V] -> [B] int64."""
    best, ids, lse = _candidates(scaled, t)
    pos = _draw(_mask_sorted(best, lse, t), uniform(t.seeds, t.steps))  # [B]
    return ids.gather(-1, pos[:, None]).squeeze(-1)


def _rows(t: SamplingTensors, rows: torch.Tensor) -> SamplingTensors:
    return SamplingTensors(t.temperature[rows], t.top_p[rows], t.top_k[rows], t.seeds[rows], t.steps[rows])


def _sample_random(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Temperature-scaled draws; rows without top-k/top-p skip the sorting: [B, V] -> [B] int64."""
    scaled = logits / t.temperature[:, None]  # [B, V]
    filtered = (t.top_k > 0) | (t.top_p < 1)  # [B]
    if not bool(filtered.any()):
        return _draw(scaled, uniform(t.seeds, t.steps))
    if bool(filtered.all()):
        return _sample_filtered(scaled, t)
    plain, rest = (~filtered).nonzero().flatten(), filtered.nonzero().flatten()
    out = torch.empty(len(t), dtype=torch.int64, device=logits.device)
    out[plain] = _draw(scaled[plain], uniform(t.seeds[plain], t.steps[plain]))
    out[rest] = _sample_filtered(scaled[rest], _rows(t, rest))
    return out


def _choose(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Greedy rows take the argmax; the others draw at random: [B, V] -> [B] int64."""
    random_rows = (t.temperature > 0).nonzero().flatten()
    if random_rows.numel() == 0:
        return logits.argmax(dim=-1)
    if random_rows.numel() == len(t):
        return _sample_random(logits, t)
    token_ids = logits.argmax(dim=-1)  # [B]
    token_ids[random_rows] = _sample_random(logits[random_rows], _rows(t, random_rows))
    return token_ids


def sample(logits: torch.Tensor, tensors: SamplingTensors, num_logprobs: int = 0,
           logprobs: bool = True) -> SampleOutput:
    """Sample one token per row of `logits` [B, V]; `num_logprobs` top alternatives per row (N).
    `logprobs` False: the caller reads none (the chosen logprobs are NaN, N = 0) and no log-softmax runs."""
    if logits.dim() != 2 or logits.shape[0] != len(tensors):
        raise ValueError(f"logits must be [B, V] with B = {len(tensors)} rows, got {tuple(logits.shape)}")
    logits = logits.float()
    token_ids = _choose(logits, tensors)  # [B]
    if not logprobs:
        nan = torch.full(token_ids.shape, float("nan"), device=logits.device)  # [B]
        return SampleOutput(token_ids, nan, token_ids[:, None][:, :0], nan[:, None][:, :0])  # N = 0
    # Raw (temperature 1) log-softmax. Its kernel stays fast on rows a grammar set mostly to -inf, where
    # `logsumexp`'s exp measured 2.5x slower (16 x 32768, one core: 4.3 against 1.7 ms).
    logp = logits.log_softmax(dim=-1)  # [B, V]
    chosen = logp.gather(-1, token_ids[:, None]).squeeze(-1)  # [B]
    top, top_ids = logp.topk(min(num_logprobs, logits.shape[-1]), dim=-1)  # [B, N]
    return SampleOutput(token_ids, chosen, top_ids, top)


def sample_rows(logits: torch.Tensor, tensors: SamplingTensors, num_logprobs: int = 0,
                logprobs: bool = True) -> SampleOutput:
    """`sample`, one row at a time: every row's token and logprobs are exactly what it would get alone
    (the batched reductions over V split differently with the row count). For deterministic mode."""
    names = [f.name for f in fields(SamplingTensors)]
    rows = [SamplingTensors(*(getattr(tensors, n)[i : i + 1] for n in names)) for i in range(len(tensors))]
    outs = [sample(logits[i : i + 1], row, num_logprobs, logprobs) for i, row in enumerate(rows)]
    return _cat(outs) if outs else sample(logits, tensors, num_logprobs, logprobs)


Out = TypeVar("Out", SampleOutput, "ScoreOutput")


def _cat(outs: list[Out]) -> Out:
    """One-row outputs stacked into one."""
    kind = type(outs[0])
    return kind(*(torch.cat([getattr(o, f.name) for o in outs]) for f in fields(kind)))


@dataclass
class ScoreOutput:
    logprobs: torch.Tensor  # [B] float32: log-softmax at the target token
    ranks: torch.Tensor  # [B] int64: 1 + how many tokens are strictly more likely than the target
    top_ids: torch.Tensor  # [B, N] int64, best first
    top_logprobs: torch.Tensor  # [B, N] float32


def score(logits: torch.Tensor, targets: torch.Tensor, num_logprobs: int = 0) -> ScoreOutput:
    """Teacher-forced scores: each row's log-softmax at its given `targets` [B] (the next prompt token),
    that token's rank and the top `num_logprobs`, from `logits` [B, V]."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [B, V] and targets [B], got {tuple(logits.shape)}, "
                         f"{tuple(targets.shape)}")
    logits = logits.float()
    lse = logits.logsumexp(dim=-1, keepdim=True)  # [B, 1]
    chosen = logits.gather(-1, targets[:, None])  # [B, 1]
    ranks = (logits > chosen).sum(dim=-1) + 1  # [B]
    top, top_ids = logits.topk(min(num_logprobs, logits.shape[-1]), dim=-1)  # [B, N]
    return ScoreOutput((chosen - lse).squeeze(-1), ranks, top_ids, top - lse)


def score_rows(logits: torch.Tensor, targets: torch.Tensor, num_logprobs: int = 0) -> ScoreOutput:
    """`score`, one row at a time: each row's numbers do not depend on how many rows are scored with
    it (how the prompt was chunked, what else ran in the step). For deterministic mode."""
    outs = [score(logits[i : i + 1], targets[i : i + 1], num_logprobs) for i in range(len(targets))]
    return _cat(outs) if outs else score(logits, targets, num_logprobs)
