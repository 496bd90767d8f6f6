"""Which expert shard serves which (layer, expert), how tokens split over copies, and an EPLB-style planner.

A `Placement` lists, per shard and per layer, the expert ids the shard holds. An expert may sit on
several shards (redundant copies of a hot expert); `route` then deals its tokens over the copies.
`plan_placement` builds a placement from observed loads in the spirit of DeepSeek's Expert
Parallelism Load Balancer (EPLB, https://github.com/deepseek-ai/EPLB, `eplb.py`): per layer, give
redundant copies to the experts with the highest load per copy (`replicate_experts`), then pack the
copies onto GPUs with equal slot counts, heaviest first onto the least-loaded GPU (`balanced_packing`).
A moray shard holds experts of every layer, so the plan is made layer by layer and a GPU's load is
judged per layer (layers run one after another, so each must be balanced on its own).

Letters: L layers, E experts, G shards (GPUs), T tokens, A active experts per token, C max copies.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

Slots = tuple[tuple[tuple[int, ...], ...], ...]  # [G][L] -> expert ids


class PlacementError(ValueError):
    """A placement that cannot serve the model (an expert nowhere, an empty shard, a bad id)."""


@dataclass(frozen=True)
class Placement:
    """slots[g][l] = the expert ids shard g holds for layer l (an id on several shards = copies)."""

    slots: Slots

    def __post_init__(self) -> None:
        try:
            slots = tuple(tuple(tuple(int(e) for e in layer) for layer in shard) for shard in self.slots)
        except (TypeError, ValueError) as e:
            raise PlacementError(f"placement slots must be [shard][layer] -> expert ids: {e}") from e
        object.__setattr__(self, "slots", slots)

    # ---- shape -------------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self.slots)

    @property
    def num_layers(self) -> int:
        return max((len(shard) for shard in self.slots), default=0)

    @property
    def num_experts(self) -> int:
        return 1 + max((e for shard in self.slots for layer in shard for e in layer), default=-1)

    def shard_experts(self, shard: int) -> dict[int, list[int]]:
        """layer -> expert ids shard `shard` loads (the weights' `experts` role); empty layers left out."""
        return {layer: sorted(ids) for layer, ids in enumerate(self.slots[shard]) if ids}

    def owners(self, layer: int, expert: int) -> list[int]:
        """Shards holding a copy of (layer, expert), in shard order."""
        return [g for g, shard in enumerate(self.slots) if layer < len(shard) and expert in shard[layer]]

    def copies(self) -> np.ndarray:
        """[L, E] number of copies of each expert."""
        counts = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for shard in self.slots:
            for layer, ids in enumerate(shard):
                for e in ids:
                    counts[layer, e] += 1
        return counts

    @classmethod
    def round_robin(cls, num_layers: int, num_experts: int, num_shards: int) -> Placement:
        """Expert e on shard e % num_shards, the same for every layer (the default)."""
        if not 1 <= num_shards <= num_experts:
            raise PlacementError(f"round robin needs 1 <= num_shards <= num_experts ({num_experts}), "
                                 f"got {num_shards} shards: some shard would hold no experts")
        shard = [tuple(e for e in range(num_experts) if e % num_shards == g) for g in range(num_shards)]
        return cls(slots=tuple(tuple(shard[g] for _ in range(num_layers)) for g in range(num_shards)))

    # ---- checks ------------------------------------------------------------------------------------
    def validate(self, num_layers: int, num_experts: int) -> None:
        """Raise `PlacementError` unless every (layer, expert) has a copy and every shard holds one."""
        if self.num_shards == 0:
            raise PlacementError("placement has no shards")
        for g, shard in enumerate(self.slots):
            if len(shard) != num_layers:
                raise PlacementError(f"shard {g} lists {len(shard)} layers, the model has {num_layers}")
            for layer, ids in enumerate(shard):
                bad = [e for e in ids if not 0 <= e < num_experts]
                if bad:
                    raise PlacementError(f"shard {g} layer {layer}: expert ids {bad} out of range "
                                         f"[0, {num_experts})")
                if len(set(ids)) != len(ids):
                    raise PlacementError(f"shard {g} layer {layer} lists an expert twice: {list(ids)}")
            if not any(shard):
                raise PlacementError(f"shard {g} holds no experts (empty shard)")
        missing = np.argwhere(self.copies_for(num_layers, num_experts) == 0)
        if len(missing):
            where = ", ".join(f"layer {lay} expert {e}" for lay, e in missing[:8].tolist())
            more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
            raise PlacementError(f"not placed on any shard: {where}{more}")

    def copies_for(self, num_layers: int, num_experts: int) -> np.ndarray:
        """[L, E] copies, padded to the model's shape (ids out of range ignored)."""
        counts = np.zeros((num_layers, num_experts), dtype=np.int64)
        have = self.copies()
        lay, exp = min(num_layers, have.shape[0]), min(num_experts, have.shape[1])
        counts[:lay, :exp] = have[:lay, :exp]
        return counts

    # ---- files -------------------------------------------------------------------------------------
    def to_json(self) -> str:
        body = {"num_shards": self.num_shards, "num_layers": self.num_layers, "num_experts": self.num_experts,
                "shards": [[list(ids) for ids in shard] for shard in self.slots]}
        return json.dumps(body)

    @classmethod
    def from_json(cls, text: str) -> Placement:
        try:
            body = json.loads(text)
            shards = body["shards"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PlacementError(f"not a placement file (want {{'shards': [[[ids]]]}}): {e}") from e
        placement = cls(slots=shards)
        if "num_layers" in body:
            placement.validate(int(body["num_layers"]), int(body.get("num_experts", placement.num_experts)))
        return placement

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        return cls.from_json(Path(path).read_text())

    # ---- routing -----------------------------------------------------------------------------------
    def shards_of(self, layer: int, expert_ids: np.ndarray, turn: np.ndarray | None = None) -> np.ndarray:
        """`route` without `loads`, in numpy: the shard serving each (token, slot), [T, A]. With one copy
        of every expert (the default) a single lookup (a few µs; it runs on every layer of every step)."""
        owner = self._owner
        if owner is None:
            return self.route(layer, torch.from_numpy(expert_ids), turn=turn).numpy()
        return owner[layer][expert_ids + 1]  # id -1 reads column 0, which is -1

    @cached_property
    def _owner(self) -> np.ndarray | None:
        """[L, 1 + E] the shard of each expert, column 0 (expert id -1) -1; None when some expert has
        more than one copy. Routing runs once per layer per step, so the common case is one numpy
        lookup (a few µs) instead of a dozen small torch ops."""
        table, _ = self._tables
        if table.shape[-1] != 1:
            return None
        owner = np.full((table.shape[0], table.shape[1] + 1), -1, dtype=np.int64)
        owner[:, 1:] = table[..., 0].numpy()
        return owner

    @cached_property
    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """owner table [L, E, C] (shard ids, -1 past the count) and copy counts [L, E]."""
        counts = torch.from_numpy(self.copies())  # [L, E]
        width = max(1, int(counts.max().item()) if counts.numel() else 1)
        table = torch.full((self.num_layers, self.num_experts, width), -1, dtype=torch.long)
        fill = torch.zeros_like(counts)
        for g, shard in enumerate(self.slots):
            for layer, ids in enumerate(shard):
                for e in ids:
                    table[layer, e, fill[layer, e]] = g
                    fill[layer, e] += 1
        return table, counts

    def route(self, layer: int, expert_ids: torch.Tensor,
              loads: Sequence[float] | None = None, turn: np.ndarray | None = None) -> torch.Tensor:
        """Shard serving each (token, slot): [T, A] int64 (-1 where expert_ids is -1).

        An expert with c copies: without `loads`, its k-th (token, slot) in row-major order goes to
        copy (turn[e] + k) % c (even split); with per-shard `loads`, its tokens split over the copies in
        proportion to `inverse_load_weights` of the owners' loads, in contiguous runs. `turn` [E] (the
        caller's, advanced in place by each expert's tokens) carries the rotation from step to step, so
        an expert that gets one token a step still alternates its copies; without it every call
        starts at copy 0.
        """
        if loads is not None and len(loads) != self.num_shards:
            raise ValueError(f"loads has {len(loads)} entries, the placement has {self.num_shards} shards")
        if self._owner is not None:
            shard = self.shards_of(layer, expert_ids.detach().to("cpu", torch.long).numpy())
            return torch.from_numpy(shard).to(expert_ids.device)
        table, counts = self._tables
        flat = expert_ids.reshape(-1).to(torch.long).cpu()  # [T*A]
        valid = flat >= 0
        e = flat.clamp(min=0)
        owners, cnt = table[layer][e], counts[layer][e]  # [N, C], [N]
        if loads is None:
            rank = _occurrence_rank(torch.where(valid, flat, -1))
            if turn is not None:
                rank = rank + torch.from_numpy(turn)[e]
                turn += np.bincount(flat[valid].numpy(), minlength=len(turn))
            copy = rank % cnt.clamp(min=1)
        else:
            rank = _occurrence_rank(torch.where(valid, flat, -1))  # [N]
            copy = _weighted_copy(owners, cnt, rank, torch.where(valid, flat, 0), valid, loads)
        shard = owners.gather(1, copy.unsqueeze(1)).squeeze(1)
        return torch.where(valid, shard, -1).reshape(expert_ids.shape).to(expert_ids.device)


def _occurrence_rank(flat: torch.Tensor) -> torch.Tensor:
    """rank[i] = how many earlier positions hold the same value as flat[i]. [N] -> [N]."""
    sorted_vals, order = torch.sort(flat, stable=True)
    first = torch.searchsorted(sorted_vals, sorted_vals)  # index where each run starts
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(len(flat)) - first
    return rank


def _weighted_copy(owners: torch.Tensor, cnt: torch.Tensor, rank: torch.Tensor, experts: torch.Tensor,
                   valid: torch.Tensor, loads: Sequence[float]) -> torch.Tensor:
    """Copy index per position so each expert's n tokens split by the owners' inverse-load weights."""
    shard_w = torch.tensor(inverse_load_weights(loads), dtype=torch.float64)  # [G]
    w = torch.where(owners >= 0, shard_w[owners.clamp(min=0)], 0.0)  # [N, C]
    cum = w.cumsum(1) / w.sum(1, keepdim=True).clamp(min=1e-12)  # [N, C]
    total = torch.bincount(experts[valid], minlength=int(experts.max().item()) + 1 if len(experts) else 1)
    frac = (rank.double() + 0.5) / total[experts].double().clamp(min=1)  # [N] position in (0, 1)
    copy = torch.searchsorted(cum, frac.unsqueeze(1)).squeeze(1)
    return torch.minimum(copy, cnt.clamp(min=1) - 1)


def inverse_load_weights(loads: Sequence[float]) -> list[float]:
    """Damped inverse load: w_i = 1 / (load_i + mean load), normalised; equal loads -> equal weights.

    The damping (adding the mean) keeps a just-started, idle replica from taking every row: loads
    [0, 10] give 3:1, not infinity:1, so the split converges instead of flapping.
    """
    if not loads:
        raise ValueError("need at least one load")
    vals = [max(0.0, float(v)) for v in loads]
    damp = sum(vals) / len(vals) or 1.0
    inv = [1.0 / (v + damp) for v in vals]
    return [x / sum(inv) for x in inv]


def split_among_replicas(n_rows: int, replica_loads: Sequence[float]) -> list[int]:
    """Row counts (summing to n_rows) for splitting one shard's rows of a step over its replicas.

    Proportional to `inverse_load_weights(replica_loads)` (less-loaded replicas get more), rounded
    by largest remainder with ties to the less-loaded replica. `replica_loads` may be tokens/s,
    in-flight rows or queue lengths: only their ratios matter.
    """
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    weights = inverse_load_weights(replica_loads)
    exact = [n_rows * w for w in weights]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (sizes[i] - exact[i], replica_loads[i], i))
    for i in by_remainder[: n_rows - sum(sizes)]:
        sizes[i] += 1
    return sizes


# ---- load statistics -------------------------------------------------------------------------------
def save_stats(path: str | Path, loads: np.ndarray) -> None:
    """Write per-(layer, expert) token counts [L, E] as {"num_layers", "num_experts", "tokens"}."""
    arr = np.asarray(loads)
    if arr.ndim != 2:
        raise ValueError(f"loads must be [layers, experts], got shape {arr.shape}")
    body = {"num_layers": arr.shape[0], "num_experts": arr.shape[1], "tokens": arr.tolist()}
    Path(path).write_text(json.dumps(body) + "\n")


def load_stats(path: str | Path) -> np.ndarray:
    """Read a stats file written by `save_stats` (or the status endpoint): [L, E] float64 token counts."""
    body = json.loads(Path(path).read_text())
    tokens = np.asarray(body["tokens"], dtype=np.float64)
    want = (int(body.get("num_layers", tokens.shape[0])), int(body.get("num_experts", tokens.shape[-1])))
    if tokens.ndim != 2 or tokens.shape != want:
        raise ValueError(f"{path}: tokens have shape {tokens.shape}, header says {want}")
    if (tokens < 0).any():
        raise ValueError(f"{path}: negative token counts")
    return tokens


# ---- balance metrics -------------------------------------------------------------------------------
def gpu_loads(placement: Placement, loads: np.ndarray) -> np.ndarray:
    """[L, G] load per shard and layer, each expert's load split evenly over its copies (as `route`)."""
    loads = np.asarray(loads, dtype=np.float64)  # [L, E]
    copies = placement.copies_for(*loads.shape)  # [L, E]
    per_copy = np.divide(loads, copies, out=np.zeros_like(loads), where=copies > 0)  # [L, E]
    out = np.zeros((loads.shape[0], placement.num_shards))
    for g, shard in enumerate(placement.slots):
        for layer, ids in enumerate(shard[: loads.shape[0]]):
            out[layer, g] = per_copy[layer, list(ids)].sum()
    return out


def layer_imbalance(placement: Placement, loads: np.ndarray) -> np.ndarray:
    """[L] max GPU load / mean GPU load per layer (1.0 for a layer with no load)."""
    per_gpu = gpu_loads(placement, loads)  # [L, G]
    mean = per_gpu.mean(axis=1)
    return np.divide(per_gpu.max(axis=1), mean, out=np.ones_like(mean), where=mean > 0)


def imbalance(placement: Placement, loads: np.ndarray) -> float:
    """Mean over layers of (max GPU load / mean GPU load); 1.0 is perfect balance."""
    return float(layer_imbalance(placement, loads).mean())


def _report(placement: Placement, loads: np.ndarray) -> dict[str, Any]:
    per_gpu = gpu_loads(placement, loads)  # [L, G]
    ratio = layer_imbalance(placement, loads)
    return {"num_shards": placement.num_shards, "imbalance_mean": float(ratio.mean()),
            "imbalance_max": float(ratio.max()), "max_gpu_load": per_gpu.max(axis=1).tolist(),
            "mean_gpu_load": per_gpu.mean(axis=1).tolist(), "gpu_total": per_gpu.sum(axis=0).tolist(),
            "slots_per_gpu": [sum(len(ids) for ids in shard) for shard in placement.slots]}


def plan_report(before: Placement, after: Placement, loads: np.ndarray) -> dict[str, Any]:
    """Per-layer max and mean GPU load, and max/mean (mean and worst over layers), before and after."""
    return {"before": _report(before, loads), "after": _report(after, loads)}


# ---- EPLB-style planner ----------------------------------------------------------------------------
def replicate_experts(load: np.ndarray, num_copies: int, max_copies: int) -> np.ndarray:
    """[E] copies per expert: start at one each, then repeatedly give a copy to the expert with the
    highest load per copy (EPLB's `replicate_experts`), never more than `max_copies` of one expert."""
    counts = np.ones(len(load), dtype=np.int64)
    for _ in range(num_copies - len(load)):
        per_copy = np.where(counts < max_copies, load / counts, -np.inf)
        hottest = int(np.argmax(per_copy))
        if per_copy[hottest] == -np.inf:
            break
        counts[hottest] += 1
    return counts


def _pack_layer(load: np.ndarray, counts: np.ndarray, num_gpus: int, capacity: int) -> list[list[int]]:
    """Experts per GPU: copies heaviest first onto the least-loaded GPU with a free slot that does not
    hold that expert yet (EPLB's `balanced_packing`), then pairwise swaps to trim the heaviest GPU."""
    per_copy = load / counts  # [E]
    items = sorted(((per_copy[e], e) for e in range(len(load)) for _ in range(counts[e])),
                   key=lambda it: (-it[0], it[1]))
    gpus: list[list[int]] = [[] for _ in range(num_gpus)]
    weight = np.zeros(num_gpus)
    for w, e in items:
        free = [g for g in range(num_gpus) if len(gpus[g]) < capacity]
        fits = [g for g in free if e not in gpus[g]]
        if fits:
            g = min(fits, key=lambda g: (weight[g], len(gpus[g]), g))
        else:
            g, moved = _make_room(gpus, e, free[0])
            weight[g] -= per_copy[moved]
            weight[free[0]] += per_copy[moved]
        gpus[g].append(e)
        weight[g] += w
    _refine(gpus, per_copy)
    return gpus


def _make_room(gpus: list[list[int]], expert: int, free_gpu: int) -> tuple[int, int]:
    """Every GPU with a free slot already holds `expert`: move some other expert from a full GPU that
    lacks `expert` onto `free_gpu`; return (that GPU, now with a free slot; the expert moved)."""
    for g, held in enumerate(gpus):
        if expert in held:
            continue
        for other in held:
            if other not in gpus[free_gpu]:
                held.remove(other)
                gpus[free_gpu].append(other)
                return g, other
    raise PlacementError(f"cannot place another copy of expert {expert}: every GPU already holds one")


def _refine(gpus: list[list[int]], per_copy: np.ndarray, max_rounds: int = 200) -> None:
    """Swap one item of the heaviest GPU with a lighter one elsewhere while the pair's max drops."""
    for _ in range(max_rounds):
        weight = [float(per_copy[held].sum()) for held in gpus]
        swap = _best_swap(gpus, per_copy, weight, top=int(np.argmax(weight)))
        if swap is None:
            return
        top, h, i, j = swap
        gpus[top][i], gpus[h][j] = gpus[h][j], gpus[top][i]


def _best_swap(gpus: list[list[int]], per_copy: np.ndarray, weight: list[float],
               top: int) -> tuple[int, int, int, int] | None:
    """(top, h, i, j): swapping gpus[top][i] with gpus[h][j] lowers the heaviest GPU the most."""
    best, best_max = None, weight[top] - 1e-9
    for h, held in enumerate(gpus):
        for i, a in enumerate(gpus[top] if h != top else []):
            for j, b in enumerate(held):
                delta = per_copy[a] - per_copy[b]
                new_max = max(weight[top] - delta, weight[h] + delta)
                if delta > 0 and new_max < best_max and a not in held and b not in gpus[top]:
                    best, best_max = (top, h, i, j), new_max
    return best


def plan_placement(loads: np.ndarray, num_gpus: int, redundant: int,
                   slots_per_gpu: int | None = None) -> Placement:
    """A placement for `num_gpus` shards with `redundant` extra expert copies per layer, from [L, E] loads.

    Per layer: `replicate_experts` (E + redundant copies, at most one copy of an expert per GPU),
    then `_pack_layer` with `slots_per_gpu` slots per GPU (default ceil((E + R) / G): equal counts
    when G divides E + R). Follows DeepSeek's EPLB (github.com/deepseek-ai/EPLB, `eplb.py`, global
    policy: no node groups) in spirit, plus a swap pass that trims the heaviest GPU.
    """
    loads = np.asarray(loads, dtype=np.float64)
    if loads.ndim != 2 or (loads < 0).any():
        raise PlacementError(f"loads must be a non-negative [layers, experts] table, got shape {loads.shape}")
    num_layers, num_experts = loads.shape
    copies = num_experts + redundant
    capacity = slots_per_gpu if slots_per_gpu is not None else math.ceil(copies / max(num_gpus, 1))
    if num_gpus < 1 or redundant < 0 or capacity < 1:
        raise PlacementError(f"need num_gpus >= 1, redundant >= 0, slots_per_gpu >= 1; got {num_gpus}, "
                             f"{redundant}, {capacity}")
    if copies < num_gpus:
        raise PlacementError(f"{num_experts} experts + {redundant} redundant copies cannot fill {num_gpus} "
                             f"GPUs: use redundant >= {num_gpus - num_experts}")
    if capacity * num_gpus < copies:
        raise PlacementError(f"{copies} expert copies per layer do not fit in {num_gpus} GPUs x "
                             f"{capacity} slots")
    layers = [_plan_layer(loads[layer], copies, num_gpus, capacity) for layer in range(num_layers)]
    return Placement(slots=tuple(tuple(tuple(sorted(layers[lay][g])) for lay in range(num_layers))
                                 for g in range(num_gpus)))


def _plan_layer(load: np.ndarray, copies: int, num_gpus: int, capacity: int) -> list[list[int]]:
    """EPLB's greedy copies, then: move one copy from one expert to another while the packed max drops
    (greedy gives a one-hot expert 3 copies of 4 slots-bound GPUs where 2 + a split cold one balance)."""
    counts = replicate_experts(load, copies, max_copies=num_gpus)
    if counts.sum() < copies:
        log.warning("only %d of %d copies are useful (one copy per GPU at most)", counts.sum(), copies)
    best = _pack_layer(load, counts, num_gpus, capacity)
    top = _packed_max(best, load, counts)
    for _ in range(REPLICA_ROUNDS if counts.max() > 1 else 0):
        found = None
        for a, b in ((a, b) for a in np.flatnonzero(counts > 1) for b in np.flatnonzero(counts < num_gpus)):
            if a == b:
                continue
            trial = counts.copy()
            trial[a], trial[b] = trial[a] - 1, trial[b] + 1
            try:
                packed = _pack_layer(load, trial, num_gpus, capacity)
            except (PlacementError, IndexError):
                continue
            if (m := _packed_max(packed, load, trial)) < top - 1e-9:
                top, found = m, (trial, packed)
        if found is None:
            break
        counts, best = found
    return best


REPLICA_ROUNDS = 8  # copy moves tried per layer


def _packed_max(gpus: list[list[int]], load: np.ndarray, counts: np.ndarray) -> float:
    per_copy = load / counts
    return max(float(per_copy[held].sum()) for held in gpus)
