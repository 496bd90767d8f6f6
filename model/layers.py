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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * weight


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
    """One engine step's tokens, flattened over sequences (prefill chunks and decodes together)."""

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
    Returns [T, H, d].
    """
    T, H, d = q.shape
    B, Q = batch.num_seqs, batch.max_query
    kv_heads = k_cache.shape[2]
    keys = k_cache[batch.block_tables].flatten(1, 2)  # [B, L, K, d]
    values = v_cache[batch.block_tables].flatten(1, 2)  # [B, L, K, d]
    L = keys.shape[1]
    keys = keys.transpose(1, 2).repeat_interleave(H // kv_heads, dim=1)  # [B, H, L, d]
    values = values.transpose(1, 2).repeat_interleave(H // kv_heads, dim=1)  # [B, H, L, d]
    queries = q.new_zeros(B, Q, H, d)
    queries[batch.seq_index, batch.query_index] = q
    query_pos = torch.zeros(B, Q, dtype=torch.long, device=q.device)  # padded queries see key 0 only
    query_pos[batch.seq_index, batch.query_index] = batch.positions
    mask = torch.arange(L, device=q.device)[None, None, :] <= query_pos[:, :, None]  # [B, Q, L]
    out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys, values, attn_mask=mask[:, None])
    return out.transpose(1, 2)[batch.seq_index, batch.query_index]  # [T, H, d]


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's router, G(x) = Softmax(TopK(x·Wg)): ids [T, A] int64 and gates [T, A] in x's dtype."""
    scores = F.linear(x, gate_weight)  # [T, E]
    top_scores, ids = torch.topk(scores.float(), top_k, dim=-1)  # [T, A]
    return ids, torch.softmax(top_scores, dim=-1).to(x.dtype)


PACK_BATCH = 16  # the row count oneDNN's weight layout is chosen for (fast from 1 to ~64 rows)


def pack_linear(w: torch.Tensor) -> torch.Tensor:
    """`w` [N, K] in the layout the fastest kernel for `linear` wants: for fp32 on CPU, oneDNN's
    blocked layout (an opaque `torch._mkldnn` tensor, reordered once here); else `w` itself.

    For the few rows a decode step gives each weight, MKL's sgemm behind `F.linear` re-reads the
    weight once per row or repacks it on every call; the packed oneDNN kernel reads it once.
    Measured on this project's 2-core AVX2 machine, fp32, rows 1/4/16: [7168, 1024] 1.3/4.3/4.9 ms
    -> 0.8/1.2/2.3 ms; [1024, 3584] 0.33/1.12/1.44 -> 0.24/0.37/0.94 ms; [32000, 1024]
    6.8/27/29 -> 4.7/6.1/11 ms. A packed tensor cannot be pickled or indexed: keep it in the
    process that made it and use it only through `linear`.
    """
    if w.device.type != "cpu" or w.dtype != torch.float32 or w.dim() != 2 or not _onednn_linear():
        return w
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_BATCH)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, w)` for a weight `pack_linear` returned (packed or not).

    oneDNN caches a kernel per input shape, each with its own buffers: fed every row count a server
    sees, one expert weight's cache grew by ~700 MB (measured). So rows are padded to a few sizes
    (`row_bucket`) and the cache stays at a few dozen kernels per weight shape.
    """
    if not w.is_mkldnn:
        return F.linear(x, w)
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    padded = row_bucket(rows)
    if padded != rows:
        flat = F.pad(flat, (0, 0, 0, padded - rows))
    y = torch.ops.mkldnn._linear_pointwise(flat, w, None, "none", [], "")[:rows]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def row_bucket(rows: int) -> int:
    """The row count `linear` computes `rows` rows with: the next power of two up to 64, then the next
    multiple of 64 (at most 2x the work at 33-64 rows, where the weight read dominates anyway)."""
    if rows <= 64:
        return 1 << max(rows - 1, 0).bit_length()
    return -(-rows // 64) * 64


_ONEDNN: bool | None = None


def _onednn_linear() -> bool:
    """Whether this torch has oneDNN's packed fp32 linear (private ops; checked once, on a tiny case)."""
    global _ONEDNN
    if _ONEDNN is None:
        try:
            w, x = torch.randn(24, 16), torch.randn(3, 16)
            got = linear(x, torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH))
            _ONEDNN = bool(torch.allclose(got, F.linear(x, w), rtol=1e-4, atol=1e-5))
        except (AttributeError, RuntimeError):
            _ONEDNN = False
    return _ONEDNN


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One expert: w2 · (silu(w1·x) ⊙ w3·x). x [n, D]; w1, w3 [F, D]; w2 [D, F]."""
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
