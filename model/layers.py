"""Mixtral's building blocks: RMSNorm, RoPE, GQA attention over a paged KV cache, router, SwiGLU.

Shape letters: T tokens in a step, B sequences in a step, Q max query tokens of one sequence in
the step, L max cached length, D model dim, H query heads, K kv heads, d head dim, E experts,
A active experts per token (top-k), F expert hidden dim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moray.model.fp8 import Fp8Linear
from moray.model.kernels import Int8Linear, Kernels, LinearWeight, linear_dense


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Mixtral's RMSNorm: normalized in fp32, cast back, then scaled (torch's fused kernel: one op, bit
    for bit the composite in fp32, measured ~35 % faster at decode sizes here)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype) * weight


def rope_tables(head_dim: int, theta: float, max_len: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos/sin tables [max_len, d] in the half-split ("rotate_half") layout HF checkpoints use."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device=device), inv_freq)  # [L, d/2]
    angles = torch.cat([angles, angles], dim=-1)  # [L, d]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, h, d]; cos/sin [T, d] already gathered at each token's position."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos[:, None] + rotated.float() * sin[:, None]).to(x.dtype)


@dataclass
class StepBatch:
    """One engine step's tokens, flattened over sequences (prefill chunks and decodes together), grouped
    by sequence in row order: sequence 0's tokens first."""

    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64: absolute position of each token in its sequence
    seq_index: torch.Tensor  # [T] int64: row of the token's sequence in this step, 0..B-1
    query_index: torch.Tensor  # [T] int64: index of the token within its sequence's chunk, 0..Q-1
    slot_mapping: torch.Tensor  # [T] int64: flat KV slot (block * block_size + offset) to write
    block_tables: torch.Tensor  # [B, nb] int64: KV blocks of each sequence (padded with any id)
    logits_index: torch.Tensor  # [N] int64: tokens whose next-token logits are wanted
    max_query: int  # Q

    @property
    def num_seqs(self) -> int:
        return int(self.block_tables.shape[0])

    @classmethod
    def for_sequence(
        cls, tokens: list[int], start: int, blocks: list[int], block_size: int, all_logits: bool = False
    ) -> StepBatch:
        """One sequence's tokens at positions start.. (a prefill chunk, or one decode token)."""
        n = len(tokens)
        pos = torch.arange(start, start + n)
        table = torch.tensor(blocks, dtype=torch.long)
        return cls(
            tokens=torch.tensor(tokens, dtype=torch.long),
            positions=pos,
            seq_index=torch.zeros(n, dtype=torch.long),
            query_index=torch.arange(n),
            slot_mapping=table[pos // block_size] * block_size + pos % block_size,
            block_tables=table[None, : -(-(start + n) // block_size)],
            logits_index=torch.arange(n) if all_logits else torch.tensor([n - 1]),
            max_query=n,
        )

    def to(self, device: torch.device) -> StepBatch:
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if f.name != "max_query"
            },
        )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: StepBatch,
) -> torch.Tensor:
    """Causal attention of the step's queries against each sequence's cached keys/values.

    q [T, H, d]; k_cache/v_cache [num_blocks, bs, K, d] (this step's k/v already written).
    Returns [T, H, d]. The K kv heads are shared by H / K query heads each without being copied
    (`enable_gqa`); a step of decodes only (one token per sequence) needs no padded query layout.
    """
    T, H, d = q.shape
    B, Q = batch.num_seqs, batch.max_query
    keys = k_cache[batch.block_tables].flatten(1, 2).transpose(1, 2)  # [B, K, L, d]
    values = v_cache[batch.block_tables].flatten(1, 2).transpose(1, 2)  # [B, K, L, d]
    L = keys.shape[2]
    if Q == 1 and T == B:  # token i is sequence i's only one (StepBatch's order)
        mask = torch.arange(L, device=q.device) <= batch.positions[:, None]  # [B, L]
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None, None],
                                             enable_gqa=True)  # [B, H, 1, d]
        return out.reshape(T, H, d)  # a view whichever layout the backend wrote (Q = 1)
    queries = q.new_zeros(B, Q, H, d)
    queries[batch.seq_index, batch.query_index] = q
    query_pos = torch.zeros(B, Q, dtype=torch.long, device=q.device)  # padded queries see key 0 only
    query_pos[batch.seq_index, batch.query_index] = batch.positions
    mask = torch.arange(L, device=q.device)[None, None, :] <= query_pos[:, :, None]  # [B, Q, L]
    out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys, values, attn_mask=mask[:, None],
                                         enable_gqa=True)
    return out.transpose(1, 2)[batch.seq_index, batch.query_index]  # [T, H, d]


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's router, G(x) = Softmax(TopK(x·Wg)): ids [T, A] int64 and gates [T, A] in x's dtype."""
    scores = F.linear(x, gate_weight)  # [T, E]
    top_scores, ids = torch.topk(scores.float(), top_k, dim=-1)  # [T, A]
    return ids, torch.softmax(top_scores, dim=-1).to(x.dtype)


def pack_linear(w: torch.Tensor, kernels: Kernels | None = None, scales: torch.Tensor | None = None
                ) -> LinearWeight:
    """`w` [N, K] in the layout of the kernel `kernels` chose for it here (model/kernels.py); without
    `kernels`, the default one, unprobed (oneDNN-packed for fp32 on CPU). A oneDNN-packed tensor cannot
    be pickled or indexed: keep it in the process that made it and use it only through `linear`.
    `scales`: an FP8 `w`'s, kept as stored (fp8.py)."""
    return (kernels or Kernels(probe=False)).pack(w, scales)


def linear(x: torch.Tensor, w: LinearWeight) -> torch.Tensor:
    """`F.linear(x, w)` for a weight `pack_linear` returned (packed, plain, int8 or fp8), x [..., K]."""
    flat = x.reshape(-1, x.shape[-1])
    y = w(flat) if isinstance(w, (Int8Linear, Fp8Linear)) else linear_dense(flat, w)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One expert: w2 · (silu(w1·x) ⊙ w3·x). x [n, D]; w1, w3 [F, D]; w2 [D, F]."""
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
