"""Experts: the `ExpertRequest` contract, a grouped `ExpertBank`, and the in-process `LocalExperts`.

Shape letters: n rows sent, k expert slots per row (≤ A), D dim, F expert hidden, E experts held.
docs/design.md, "The contracts": y[n, D] = Σ_j gates[:, j] · SwiGLU_{expert_ids[:, j]}(x), where
expert_ids = -1 marks a slot whose expert lives on another shard.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from moray.model.invariant import RowTiler
from moray.model.kernels import Kernels, LinearWeight, weight_bytes
from moray.model.layers import linear, pack_linear, swiglu
from moray.model.weights import SCALE

# A request of at most this many slots (rows x experts per row) is grouped in Python (`ExpertBank._few`):
# measured faster at 1-2 rows of top-2 (-5 % / -3 % of the experts' time, small preset), slower from 4.
FEW_SLOTS = 4


@dataclass
class ExpertRequest:
    layer: int
    x: torch.Tensor  # [n, D]
    expert_ids: torch.Tensor  # [n, k] int64, global expert ids, -1 = padding
    gates: torch.Tensor  # [n, k]


class ExpertBank(torch.nn.Module):
    """Several experts of one layer, computed grouped: tokens sorted by expert, one matmul pair per
    expert that has tokens (never a loop over tokens).

    `deterministic`: batch-invariant numerics (invariant.py): each expert runs in row tiles that
    compute as a full tile does (`RowTiler`) and a token's slots are summed in slot order, so a
    token's output depends only on its own row, ids and gates, whatever else the request holds.
    """

    def __init__(
        self,
        expert_ids: Iterable[int],
        w1: torch.Tensor,
        w2: torch.Tensor,
        w3: torch.Tensor,
        num_global_experts: int,
        *,
        deterministic: bool = False,
        kernels: Kernels | None = None,
        scales: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """`scales`: FP8 weights' as stored, "w1" / "w3" [E, F] and "w2" [E, D] (fp8.py)."""
        super().__init__()
        self.expert_ids = list(expert_ids)
        self.deterministic = deterministic
        self.tiles = RowTiler()
        # w1 and w3 fused: one matmul gives both halves of the SwiGLU input. Each expert's weights in
        # the layout of the kernel `kernels` chose here (`pack_linear`; int8 or fp8 with `kernels`').
        w13 = torch.cat([w1, w3], dim=1)  # [E, 2F, D]
        s13, s2 = (torch.cat([scales["w1"], scales["w3"]], dim=1), scales["w2"]) if scales else (None, None)
        self.w13: list[LinearWeight] = _pack_each(w13, s13, kernels)  # E x [2F, D]
        self.w2: list[LinearWeight] = _pack_each(w2, s2, kernels)  # E x [D, F]
        del w13
        self._index(num_global_experts, torch.device("cpu"))

    @classmethod
    def from_weights(
        cls,
        tensors: Mapping[str, torch.Tensor],
        layer: int,
        expert_ids: Iterable[int],
        num_global_experts: int,
        *,
        deterministic: bool = False,
        kernels: Kernels | None = None,
    ) -> ExpertBank:
        ids = sorted(expert_ids)
        stack = {
            w: torch.stack([tensors[f"layers.{layer}.experts.{e}.{w}"] for e in ids])
            for w in ("w1", "w2", "w3")
        }
        scales = {  # FP8 weights kept as stored (weights.py `SCALE`)
            w: torch.stack([tensors[f"layers.{layer}.experts.{e}.{w}{SCALE}"] for e in ids])
            for w in ("w1", "w2", "w3") if f"layers.{layer}.experts.{ids[0]}.{w}{SCALE}" in tensors
        }
        return cls(
            ids, stack["w1"], stack["w2"], stack["w3"], num_global_experts, deterministic=deterministic,
            kernels=kernels, scales=scales or None,
        )

    @classmethod
    def combine(
        cls, banks: Iterable[ExpertBank], expert_ids: Iterable[int], num_global_experts: int
    ) -> ExpertBank:
        """A bank of `expert_ids`, each expert's packed weights taken from the first of `banks` that holds
        it: shared, not copied (so a bank can gain or lose experts without re-reading or repacking the
        others; what no bank keeps a reference to is freed)."""
        sources = list(banks)
        ids = sorted(expert_ids)
        where = {}
        for bank in reversed(sources):
            where.update({e: (bank, i) for i, e in enumerate(bank.expert_ids)})
        missing = [e for e in ids if e not in where]
        if missing or not sources:
            raise ValueError(f"cannot combine experts {missing or ids}: no bank holds them")
        out = cls.__new__(cls)
        torch.nn.Module.__init__(out)
        out.expert_ids, out.deterministic, out.tiles = ids, sources[0].deterministic, sources[0].tiles
        out.w13 = [where[e][0].w13[where[e][1]] for e in ids]  # E x [2F, D]
        out.w2 = [where[e][0].w2[where[e][1]] for e in ids]  # E x [D, F]
        out._index(num_global_experts, sources[0].local_index.device)
        return out

    def _index(self, num_global_experts: int, device: torch.device) -> None:
        """`local_index` (global id -> row in w13/w2, -1 where not held) on `device`; as a list for `_few`."""
        local = torch.full((num_global_experts,), -1, dtype=torch.long)
        local[torch.tensor(self.expert_ids, dtype=torch.long)] = torch.arange(len(self.expert_ids))
        self.local_index: torch.Tensor
        self.register_buffer("local_index", local.to(device), persistent=False)
        self._local: list[int] = local.tolist()

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        n, k = expert_ids.shape
        if n * k <= FEW_SLOTS and not self.deterministic:
            return self._few(x, expert_ids, gates)
        flat_ids = expert_ids.reshape(-1)  # [n*k]
        local = torch.where(flat_ids >= 0, self.local_index[flat_ids.clamp(min=0)], -1)  # [n*k]
        keep = (local >= 0).nonzero().squeeze(1)
        order = keep[torch.argsort(local[keep], stable=True)]  # slots sorted by expert
        counts = torch.bincount(local[order], minlength=len(self.expert_ids)).tolist()
        rows = order // k  # [m] token row of each sorted slot
        xs = x.index_select(0, rows)  # [m, D] (the same as x[rows], several times faster on CPU)
        out = torch.empty_like(xs)
        start = 0
        for e, count in enumerate(counts):  # one grouped matmul per expert, never per token
            if count:
                out[start : start + count] = self._expert(e, xs[start : start + count])
                start += count
        weighted = out * gates.reshape(-1)[order, None].to(out.dtype)  # [m, D]
        if self.deterministic:
            return _sum_slots(weighted, order, n, k)
        y = torch.zeros_like(x)
        y.index_add_(0, rows, weighted)
        return y

    def _few(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """`forward` for a few slots (decode at low concurrency), grouped in Python: a third of the ops, and
        the same numbers (each expert's rows in row order, added to zeros in expert order, as `forward`)."""
        n, k = expert_ids.shape
        local = self._local
        slots: dict[int, list[int]] = {}
        for slot, e in enumerate(expert_ids.reshape(-1).tolist()):
            if e >= 0 and local[e] >= 0:
                slots.setdefault(local[e], []).append(slot)
        y = torch.zeros_like(x)
        flat_gates = gates.reshape(-1, 1)
        for e in sorted(slots):
            rows = [s // k for s in slots[e]]
            every_row = rows == list(range(n))
            xs = x if every_row else x.index_select(0, torch.tensor(rows, device=x.device))
            g = flat_gates[slots[e][0]: slots[e][0] + 1] if len(rows) == 1 else flat_gates[slots[e]]
            weighted = self._swiglu(e, xs) * g.to(x.dtype)
            if every_row:
                y += weighted
            else:
                y.index_add_(0, torch.tensor(rows, device=x.device), weighted)
        return y

    def _expert(self, e: int, xs: torch.Tensor) -> torch.Tensor:
        if self.deterministic:  # every expert of the bank has the same shapes: one key
            (y,) = self.tiles.run(("swiglu",), lambda t: (self._swiglu(e, t),), xs)
            return y
        return self._swiglu(e, xs)

    def _swiglu(self, e: int, xs: torch.Tensor) -> torch.Tensor:
        gate_up = linear(xs, self.w13[e])  # [m, 2F]
        g, u = gate_up.chunk(2, dim=-1)
        return linear(F.silu(g) * u, self.w2[e])  # [m, D]

    def param_bytes(self) -> int:
        """Resident bytes of the bank's expert weights (int8 / fp8 ones: their 8-bit values and scales)."""
        return sum(map(weight_bytes, (*self.w13, *self.w2)))


def _pack_each(w: torch.Tensor, scales: torch.Tensor | None, kernels: Kernels | None) -> list[LinearWeight]:
    """Each expert's weight of w [E, N, K] (FP8 ones with their `scales` [E, N]) packed on its own."""
    if scales is None:
        return [pack_linear(we, kernels) for we in w.unbind(0)]
    return [pack_linear(we, kernels, se) for we, se in zip(w.unbind(0), scales.unbind(0), strict=True)]


class LocalExperts:
    """Every expert of every layer in this process: the parity oracle and the single-process backend."""

    def __init__(self, banks: Mapping[int, ExpertBank]) -> None:
        self.banks = dict(banks)

    @classmethod
    def from_weights(
        cls,
        tensors: Mapping[str, torch.Tensor],
        experts: Mapping[int, Iterable[int]],
        num_global_experts: int,
        *,
        deterministic: bool = False,
        kernels: Kernels | None = None,
    ) -> LocalExperts:
        return cls(
            {
                layer: ExpertBank.from_weights(
                    tensors, layer, ids, num_global_experts, deterministic=deterministic, kernels=kernels
                )
                for layer, ids in experts.items()
            }
        )

    def serve(self, request: ExpertRequest) -> torch.Tensor:
        return self.banks[request.layer](request.x, request.expert_ids, request.gates)

    async def __call__(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor
    ) -> torch.Tensor:
        return self.serve(ExpertRequest(layer, x, ids, gates))


def _sum_slots(weighted: torch.Tensor, order: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """y [n, D]: each row's weighted slot outputs added in slot order (index_add_'s order follows the
    sort, and on CUDA its atomics; here a token's sum is the same whatever else the batch holds).
    weighted [m, D] for the flat slots `order` [m] (slot = row * k + j); other slots add zero."""
    per_slot = weighted.new_zeros(n * k, weighted.shape[-1])
    per_slot[order] = weighted
    per_slot = per_slot.view(n, k, weighted.shape[-1])  # [n, k, D]
    y = per_slot[:, 0].clone()
    for j in range(1, k):
        y += per_slot[:, j]
    return y


def reference_moe(
    x: torch.Tensor,
    ids: torch.Tensor,
    gates: torch.Tensor,
    weights: Mapping[str, torch.Tensor],
    layer: int,
    num_experts: int,
) -> torch.Tensor:
    """The slow, obvious loop (mistral-inference's moe.py): the oracle for `ExpertBank`."""
    y = torch.zeros_like(x)
    for e in range(num_experts):
        rows, slot = torch.where(ids == e)
        if len(rows):
            w = [weights[f"layers.{layer}.experts.{e}.{n}"] for n in ("w1", "w2", "w3")]
            y[rows] += gates[rows, slot, None] * swiglu(x[rows], *w)
    return y


def _numpy(a: torch.Tensor | np.ndarray) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.detach().to("cpu", torch.long).numpy()


@lru_cache(maxsize=1024)
def _arange(n: int) -> torch.Tensor:
    """A shared arange(n): read only."""
    return torch.arange(n)


class ShardPart(NamedTuple):
    """One shard's share of a layer's tokens."""

    rows: torch.Tensor  # [n] int64 (CPU): which rows of the layer's x go to the shard, ascending
    expert_ids: torch.Tensor  # [n, A] int64 (CPU), -1 where another shard serves the slot
    gates: torch.Tensor  # [n, A] (the gates' device and dtype); a slot whose id is -1 is ignored


def split_by_shard(ids: torch.Tensor | np.ndarray, gates: torch.Tensor, shard_of: torch.Tensor | np.ndarray,
                   num_shards: int) -> list[ShardPart]:
    """Per shard: its rows, their expert ids with -1 where another shard serves, and their gates.

    ids, gates, shard_of: [T, A]. A token goes to a shard once, with every slot that shard serves.
    Runs on every layer of every step on a few dozen elements, where each torch op costs microseconds of
    dispatch: the index work is a handful of numpy operations over all shards at once.
    """
    ids_np, shard_np = _numpy(ids), _numpy(shard_of)
    t, a = ids_np.shape
    mine = shard_np[None] == np.arange(num_shards)[:, None, None]  # [S, T, A]
    hit = mine.any(axis=2)  # [S, T]
    rows_per_shard, slots_per_shard = hit.sum(axis=1).tolist(), mine.sum(axis=(1, 2)).tolist()
    every_row = _arange(t)
    parts = []
    for s in range(num_shards):
        n = rows_per_shard[s]
        if n == t:  # every row (a small decode step's usual case): nothing to gather
            rows, sids, sgates = every_row, ids_np, gates
        else:
            r = np.flatnonzero(hit[s])
            rows, sids = torch.from_numpy(r), ids_np[r]
            sgates = gates.index_select(0, rows.to(gates.device))
        if slots_per_shard[s] == n * a:  # every slot of its rows is this shard's
            parts.append(ShardPart(rows, torch.from_numpy(np.array(sids)), sgates))
        else:
            m = mine[s] if n == t else mine[s][rows.numpy()]
            parts.append(ShardPart(rows, torch.from_numpy(np.where(m, sids, -1)), sgates))
    return parts
