"""Batch-invariant numerics: a row's results do not depend on what else is in the step.

The fast kernels choose their blocking, their split of a reduction over threads and even their
algorithm from the shapes they are given (oneDNN's GEMM splits K differently for 1 and 16 rows at
K = 3584; ATen splits a row reduction over threads once a tensor holds 32k elements; SDPA's blocks
follow the lengths), so a token's logits move in the last bits with the step's row count and with
how its prompt was chunked. Here every row-wise operation that reduces (matmuls, norms, the
router, an expert) runs in tiles of `ROW_TILE` rows, and a partial tile only in a call size probed
to compute every row exactly as a full tile does (`RowTiler`): a row's result is then the same in
any tile, whatever its neighbours (checked by the tests, which compare a prompt prefilled in chunks
of 1, 7 and all, alone and among other requests). Attention
goes over the keys in fixed blocks of `KEY_BLOCK` positions, always from position 0, with an
online softmax folded block by block in that order: a query sees the same sums in prefill and in
decode (after Thinking Machines, "Defeating Nondeterminism in LLM Inference", 2025, and vLLM's
batch-invariant mode). Its per-block operations are batched matmuls of fixed per-entry shape and
reductions over the `KEY_BLOCK` keys (never split over threads: the rows outnumber them); on CPU
each entry's result was measured independent of the batch count (1 to 4096), so rows go in
unpadded chunks of up to `CPU_ATTENTION_ROWS`; elsewhere (cuBLAS picks kernels by batch count)
in padded tiles of `ROW_TILE`.

Shape letters as in layers.py; R rows of a tile, G query heads per KV head, S key positions of a block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moray.model.kernels import LinearWeight
from moray.model.layers import StepBatch, linear, rms_norm

ROW_TILE = 16  # rows per call: the row count oneDNN's packed weights are laid out for (PACK_BATCH)
KEY_BLOCK = 64  # key positions per attention block
MAX_CALL_ROWS = 64  # RowTiler's largest call (where it computes rows as ROW_TILE-row calls do)
CPU_ATTENTION_ROWS = 64  # queries per attention call on CPU (bounds the gathered keys' memory)


def by_row_tiles(
    fn: Callable[..., tuple[torch.Tensor, ...]], *xs: torch.Tensor, tile: int = ROW_TILE, pad: bool = True
) -> tuple[torch.Tensor, ...]:
    """`fn` applied to xs (all [T, ...]) in calls of exactly `tile` rows (`pad`: the last tile padded
    with zero rows; else at most `tile` rows); outputs [T, ...] each."""
    rows = xs[0].shape[0]
    padded = max(-(-rows // tile), 1) * tile if pad else rows
    xs = tuple(_pad_rows(x, padded) for x in xs)
    outs = [fn(*(x[i : i + tile] for x in xs)) for i in range(0, max(padded, 1), tile)]
    return tuple(torch.cat(parts)[:rows] for parts in zip(*outs, strict=True))


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


RowFn = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


class RowTiler:
    """Runs row-wise functions (linear, norm, router, an expert) in calls whose every row comes out
    exactly as in a call of `tile` rows (the reference tile), whatever the call's other rows.

    Kernels pick their algorithm from the shape, so the same rows can come out differently in a
    call of another size: measured, oneDNN's packed fp32 GEMM at K = 3584 computes 1 row unlike 2..256
    rows (equal for K = 1024). So for each kind of call (`key`: the function and its weights' shapes)
    the first use probes, on random rows, which call sizes 1, 2, 4, .. `max_call` give every row what
    it gets in reference tiles (at the front and at the back of a call). Rows then go in calls of the
    largest size that passed, the rest padded to the smallest that holds it (the reference size always
    passes). Kernels choose by shape, not by data, so a size that agrees on random rows runs the same
    reduction order. A decode step then costs a few rows, and a prefill calls of up to `max_call`.
    """

    def __init__(self, tile: int = ROW_TILE, max_call: int = MAX_CALL_ROWS) -> None:
        self.tile, self.max_call = tile, max(max_call, tile)
        self._sizes: dict[tuple[object, ...], list[int]] = {}  # key -> call sizes that agree, ascending

    def run(self, key: tuple[object, ...], fn: RowFn, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """fn(x) for x [T, ...], every row computed as in a reference tile: outputs [T, ...] each."""
        sizes = self._sizes.get(key) or self._probe(key, fn, x)
        rows, big = x.shape[0], sizes[-1]
        bounds = [(i, i + big) for i in range(0, rows - rows % big, big)]
        rest = rows % big
        if rest or not rows:
            bounds.append((rows - rest, rows - rest + next(n for n in sizes if n >= rest)))
        x = _pad_rows(x, bounds[-1][1])
        outs = [fn(x[a:b]) for a, b in bounds]
        return tuple(torch.cat(parts)[:rows] for parts in zip(*outs, strict=True))

    def _probe(self, key: tuple[object, ...], fn: RowFn, like: torch.Tensor) -> list[int]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.max_call, *like.shape[1:], generator=g).to(like.device, like.dtype)
        tiles = [fn(x[i : i + self.tile]) for i in range(0, self.max_call, self.tile)]
        ref = [torch.cat(parts) for parts in zip(*tiles, strict=True)]  # rows as reference tiles give them

        def agrees(n: int) -> bool:
            at = (0,) if n >= self.tile else (0, self.tile - n)  # inside the first reference tile
            calls = [(a, fn(x[a : a + n])) for a in at]
            return all(torch.equal(y, r[a : a + n]) for a, ys in calls for y, r in zip(ys, ref, strict=True))

        candidates = (1 << i for i in range(self.max_call.bit_length()))
        self._sizes[key] = [n for n in candidates if n == self.tile or (n <= self.max_call and agrees(n))]
        return self._sizes[key]

    def linear(self, x: torch.Tensor, w: LinearWeight) -> torch.Tensor:
        """`linear(x, w)`: x [..., K] -> [..., N]."""
        flat = x.reshape(-1, x.shape[-1])
        key = ("linear", tuple(w.shape), w.dtype, w.device, w.is_mkldnn, type(w))
        (y,) = self.run(key, lambda t: (linear(t, w),), flat)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """`rms_norm`: x [T, D]."""
        (y,) = self.run(("rms_norm", tuple(weight.shape)), lambda t: (rms_norm(t, weight, eps),), x)
        return y

    def route(
        self, x: torch.Tensor, gate_weight: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixtral's router (layers.route): ids [T, A], gates [T, A]."""

        def one(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            top_scores, ids = torch.topk(F.linear(t, gate_weight).float(), top_k, dim=-1)  # [R, A]
            return ids, torch.softmax(top_scores, dim=-1).to(t.dtype)

        ids, gates = self.run(("route", tuple(gate_weight.shape), top_k), one, x)
        return ids, gates


class InvariantAttention:
    """Causal attention (as layers.paged_attention) whose result for a query depends only on the query
    and its sequence's cached keys/values. On CPU, rows go in unpadded chunks of up to
    `CPU_ATTENTION_ROWS` once a probe on random rows finds them computed exactly as alone (measured
    here: the batched GEMMs' entries do not depend on the batch count); else in padded `ROW_TILE`s."""

    def __init__(self) -> None:
        self._unpadded: dict[tuple[object, ...], bool] = {}  # (shapes, dtype) -> chunks agree with alone

    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: StepBatch
    ) -> torch.Tensor:
        """q [T, H, d]; k_cache/v_cache [num_blocks, bs, K, d] -> [T, H, d]."""
        tables = batch.block_tables[batch.seq_index]  # [T, nb]: each token's own block table

        def one(q: torch.Tensor, pos: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor]:
            return (_attend_tile(q, pos, tables, k_cache, v_cache),)

        unpadded = q.device.type == "cpu" and self._chunks_agree(q, k_cache)
        tile = CPU_ATTENTION_ROWS if unpadded else ROW_TILE
        (out,) = by_row_tiles(one, q, batch.positions, tables, tile=tile, pad=not unpadded)
        return out

    def _chunks_agree(self, like_q: torch.Tensor, like_cache: torch.Tensor) -> bool:
        key = (tuple(like_q.shape[1:]), tuple(like_cache.shape[1:]), like_q.dtype)
        if key not in self._unpadded:
            self._unpadded[key] = _probe_chunks(like_q, like_cache)
        return self._unpadded[key]


def _probe_chunks(like_q: torch.Tensor, like_cache: torch.Tensor) -> bool:
    """Do chunks of 64 and of 5 random rows (positions over 3 key blocks) compute each row as alone?"""
    g = torch.Generator().manual_seed(0)
    rows, span, bs = CPU_ATTENTION_ROWS, 3 * KEY_BLOCK, like_cache.shape[1]
    nb = -(-span // bs)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(like_q.device, like_q.dtype)

    k, v = rand(nb, *like_cache.shape[1:]), rand(nb, *like_cache.shape[1:])
    q, pos = rand(rows, *like_q.shape[1:]), torch.randint(0, span, (rows,), generator=g)
    tables = torch.arange(nb).expand(rows, nb).contiguous().to(like_q.device)
    pos = pos.to(like_q.device)
    alone = torch.cat(
        [_attend_tile(q[i : i + 1], pos[i : i + 1], tables[i : i + 1], k, v) for i in range(rows)]
    )
    five = _attend_tile(q[7:12], pos[7:12], tables[7:12], k, v)
    return torch.equal(_attend_tile(q, pos, tables, k, v), alone) and torch.equal(five, alone[7:12])


def _attend_tile(
    q: torch.Tensor, pos: torch.Tensor, tables: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> torch.Tensor:
    """One tile: q [R, H, d], pos [R], tables [R, nb]; keys of blocks past a row's position add
    exact zeros (p = 0, rescale by 1), so a longer neighbour in the tile changes nothing."""
    if q.shape[0] == 0:
        return q
    R, H, d = q.shape
    kv_heads, bs = k_cache.shape[2], k_cache.shape[1]
    qg = (q.float() * d**-0.5).view(R, kv_heads, H // kv_heads, d)  # [R, K, G, d]
    m = qg.new_full(qg.shape[:3], float("-inf"))  # [R, K, G] running max
    den = qg.new_zeros(qg.shape[:3])  # [R, K, G] running sum of exp
    acc = torch.zeros_like(qg)  # [R, K, G, d]
    for start in range(0, int(pos.max()) + 1, KEY_BLOCK):
        key_pos = torch.arange(start, start + KEY_BLOCK, device=q.device)  # [S]
        block_col = (key_pos // bs).clamp(max=tables.shape[1] - 1)
        slots = tables[:, block_col] * bs + key_pos % bs  # [R, S]
        k = k_cache.flatten(0, 1)[slots].float()  # [R, S, K, d]
        v = v_cache.flatten(0, 1)[slots].float()  # [R, S, K, d]
        # Operands copied to one fixed layout: a view's strides vary with R (size-1 dims), and the
        # GEMM kernel (so the rounding) follows the layout.
        scores = qg @ k.permute(0, 2, 3, 1).contiguous()  # [R, K, G, S]
        future = (key_pos[None, :] > pos[:, None])[:, None, None]  # [R, 1, 1, S]
        scores = scores.masked_fill(future, float("-inf"))
        m_new = torch.maximum(m, scores.amax(dim=-1))  # [R, K, G]
        scale = (m - m_new).exp()  # [R, K, G]: 0 on the first block, 1 where the block is all future
        p = (scores - m_new[..., None]).exp()  # [R, K, G, S]
        den = den * scale + p.sum(dim=-1)
        acc = acc * scale[..., None] + p @ v.transpose(1, 2).contiguous()  # [R, K, G, d]
        m = m_new
    return (acc / den[..., None]).reshape(R, H, d).to(q.dtype)
