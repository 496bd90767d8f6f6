"""Where the router sends tokens: Mixtral's routing analysis (arXiv 2401.04088, §5), offline and live.

`record_routing` runs text through the real model (no serving) and records the router's top-k
choices for every token at every layer; from those come the paper's two analyses, which
`moray routing-report` (`deploy/cli/routing_report.py`) writes and plots:

- Figure 7, expert proportions: the share of assignments each expert receives, per layer, per domain
  (one input file is one domain). Every token counts once for each of its k chosen experts, so a
  layer's proportions sum to 1 (with top-2, one expert can get at most half).
- Figure 8 / Table 5, temporal locality: "the proportion of times the same expert is assigned to a
  token i and its following token i+1". "First choice": consecutive tokens whose highest-weighted
  expert is the same. "First or second choice": the same expert appears among the top-2 of both
  consecutive tokens, i.e. their top-k sets share at least one expert (for any k, we report the
  overlap of the top-k sets). The paper's reference for random assignments, 1/8 = 12.5% and
  1 - 6/8 · 5/7 ≈ 46% for 8 experts, is derived here from E and k (`chance_levels`): two tokens
  whose choices are independent uniform draws repeat their first choice with probability 1/E, and
  their k-sets are disjoint with probability C(E-k, k) / C(E, k).

Live, the server counts tokens per (layer, expert); `live_routing` turns those counters into the
JSON of `GET /v1/moray/routing`.

Shape letters: T tokens, L layers, E experts, A active experts per token (top-k).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from moray.model.kv_cache import KVCache
from moray.model.layers import StepBatch
from moray.model.mixtral import ExpertBackend, Mixtral

logger = logging.getLogger(__name__)

KV_BLOCK_SIZE = 16
Rates = dict[str, np.ndarray]  # "first_choice" / "first_or_second" -> [L]


# ---------------------------------------------------------------- recording


class _RecordingExperts:
    """An expert backend that forwards every call and keeps the router's ids, layer by layer."""

    def __init__(self, inner: ExpertBackend, n_layers: int) -> None:
        self.inner = inner
        self.ids: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    async def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor,
                       gates: torch.Tensor) -> torch.Tensor:
        self.ids[layer].append(ids.cpu())  # [T, A]
        return await self.inner(layer, x, ids, gates)


def record_routing(model: Mixtral, experts: ExpertBackend, tokens: list[int],
                   chunk: int = 512) -> torch.Tensor:
    """The router's top-k expert ids [T, L, A] (best first) for one sequence, run forward in chunks.

    The tokens go through the real forward pass, prefill chunk by prefill chunk through a KV cache,
    so every layer routes the hidden states the model itself computes. Runs its own event loop:
    call it from synchronous code.
    """
    cfg = model.cfg
    if len(tokens) > cfg.max_seq_len:
        raise ValueError(f"{len(tokens)} tokens exceed the model's max_seq_len {cfg.max_seq_len}")
    if not tokens:
        return torch.empty((0, cfg.n_layers, cfg.top_k), dtype=torch.long)
    recorder = _RecordingExperts(experts, cfg.n_layers)
    blocks = list(range(-(-len(tokens) // KV_BLOCK_SIZE)))
    kv = KVCache(cfg, len(blocks), KV_BLOCK_SIZE, model.dtype, model.device)

    async def run_chunks() -> None:
        for start in tqdm(range(0, len(tokens), chunk), desc="routing", unit="chunk", leave=False):
            batch = StepBatch.for_sequence(tokens[start:start + chunk], start, blocks, KV_BLOCK_SIZE)
            await model.forward_step(batch.to(model.device), kv, recorder)

    with torch.inference_mode():
        asyncio.run(run_chunks())
    return torch.stack([torch.cat(per_layer) for per_layer in recorder.ids], dim=1)  # [T, L, A]


# ---------------------------------------------------------------- analysis (pure numpy)


def expert_counts(ids: np.ndarray | torch.Tensor, num_experts: int) -> np.ndarray:
    """Assignments per (layer, expert) [L, E]: each token counts once for each chosen expert."""
    ids = np.asarray(ids)  # [T, L, A]
    _, n_layers, _ = ids.shape
    flat = ids + num_experts * np.arange(n_layers)[None, :, None]  # [T, L, A], unique per (layer, expert)
    return np.bincount(flat.ravel(), minlength=n_layers * num_experts).reshape(n_layers, num_experts)


def expert_proportions(ids: np.ndarray | torch.Tensor, num_experts: int) -> np.ndarray:
    """Share of each layer's assignments that each expert receives [L, E]; rows sum to 1 (0 if T = 0)."""
    return row_shares(expert_counts(ids, num_experts))


def row_shares(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)  # [L, 1]
    return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)


def repetition_rates(ids: np.ndarray | torch.Tensor) -> Rates:
    """Per layer, the share of consecutive token pairs (i, i+1) that repeat an expert.

    `first_choice` [L]: both tokens' first (highest-weighted) expert is the same.
    `first_or_second` [L]: the two tokens' top-k sets share at least one expert.
    Needs ids sorted best first along A (as `torch.topk` returns them) and T >= 2.
    """
    ids = np.asarray(ids)  # [T, L, A]
    if ids.shape[0] < 2:
        raise ValueError("repetition rates need at least two tokens")
    prev, nxt = ids[:-1], ids[1:]  # [T-1, L, A]
    first = prev[:, :, 0] == nxt[:, :, 0]  # [T-1, L]
    overlap = (prev[:, :, :, None] == nxt[:, :, None, :]).any(axis=(2, 3))  # [T-1, L]
    return {"first_choice": first.mean(axis=0), "first_or_second": overlap.mean(axis=0)}


def chance_levels(num_experts: int, top_k: int) -> dict[str, float]:
    """The repetition rates of random routing: each token's ordered top-k drawn uniformly, independently.

    First choice: P(two uniform draws from E agree) = 1/E.
    First or second choice: 1 - P(two uniform k-subsets of E are disjoint) = 1 - C(E-k, k) / C(E, k)
    (math.comb(E-k, k) is 0 when 2k > E: the sets must then overlap).
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
    disjoint = math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return {"first_choice": 1.0 / num_experts, "first_or_second": 1.0 - disjoint}


def default_layers(n_layers: int) -> list[int]:
    """First, middle and last layer, as the paper shows (0, 15, 31 of 32)."""
    return sorted({0, (n_layers - 1) // 2, n_layers - 1})


# ---------------------------------------------------------------- live


def live_routing(token_counts: Sequence[Sequence[int]] | np.ndarray) -> dict[str, Any]:
    """JSON for `GET /v1/moray/routing` from the server's tokens per (layer, expert) [L][E].

    `proportions` [L][E]: each layer's share per expert (0 when the layer saw nothing).
    `imbalance` [L]: the hottest expert's count over the mean count per expert (1 = perfectly even;
    null when the layer saw no tokens).
    """
    counts = np.asarray(token_counts, dtype=np.int64)  # [L, E]
    if counts.ndim != 2:
        raise ValueError(f"token counts must be [layers][experts], got shape {counts.shape}")
    n_layers, n_experts = counts.shape
    totals = counts.sum(axis=1)  # [L]
    imbalance = [float(c.max() * n_experts / t) if t > 0 else None
                 for c, t in zip(counts, totals, strict=True)]
    return {
        "layers": n_layers,
        "experts": n_experts,
        "counts": counts.tolist(),
        "assignments": totals.tolist(),
        "proportions": row_shares(counts).tolist(),
        "imbalance": imbalance,
    }
