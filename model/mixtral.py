"""The Mixtral model, attention side: embeddings, attention, norms, routers, lm_head.

The experts sit behind the `ExpertBackend` contract (docs/design.md, "The contracts"): an awaitable
`(layer, x [T, D], ids [T, A], gates [T, A]) -> y [T, D]`. `LocalExperts` serves it in process;
the dispatcher serves it from expert shards. Shape letters as in layers.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from moray.model.config import MixtralConfig
from moray.model.experts import LocalExperts
from moray.model.invariant import InvariantAttention, RowTiler
from moray.model.kernels import Kernels, LinearWeight, weight_bytes
from moray.model.kv_cache import KVCache
from moray.model.layers import (
    StepBatch,
    apply_rope,
    linear,
    pack_linear,
    paged_attention,
    rms_norm,
    rope_tables,
    route,
)
from moray.model.weights import SCALE, load_attention, load_experts


class ExpertBackend(Protocol):
    def __call__(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor
    ) -> Awaitable[torch.Tensor]: ...


@dataclass
class Routed:
    """What one layer's attention half hands to the experts."""

    h: torch.Tensor  # [T, D] residual stream after attention
    x: torch.Tensor  # [T, D] ffn-normed input of the experts
    ids: torch.Tensor  # [T, A]
    gates: torch.Tensor  # [T, A]


PACKED = ("wqkv", "wo", "lm_head")  # weights used only through `linear` (the embedding is indexed)


class Mixtral(torch.nn.Module):
    """`deterministic`: batch-invariant numerics (invariant.py): a token's results do not depend on
    the other tokens of its step, nor on how its prompt was chunked; slower. Default: the fastest
    kernels, whose last bits follow the step's shapes."""

    def __init__(
        self, cfg: MixtralConfig, weights: Mapping[str, torch.Tensor], *, deterministic: bool = False,
        kernels: Kernels | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.deterministic = cfg, deterministic
        tiles = RowTiler()
        self._linear = tiles.linear if deterministic else linear
        self._norm = tiles.rms_norm if deterministic else rms_norm
        self._attend = InvariantAttention() if deterministic else paged_attention
        self._route = tiles.route if deterministic else route
        expert_names = [n for n in weights if ".experts." in n]
        if expert_names:
            raise ValueError(f"the attention side must hold no expert weight, got {expert_names[:3]}")
        tensors = dict(weights)
        for i in range(cfg.n_layers):  # q, k and v in one matmul
            p = f"layers.{i}."
            _fuse(tensors, [p + "wq", p + "wk", p + "wv"], p + "wqkv")
        # The big matmul weights in the layout of the kernel `kernels` chose here (`pack_linear`: measured
        # per shape; int8 or fp8 with `kernels`', FP8 ones kept as stored with their scales); everything
        # else as Parameters.
        packed = {n: pack_linear(tensors.pop(n), kernels, tensors.pop(n + SCALE, None))
                  for n in list(tensors) if n.endswith(PACKED)}
        self.params = torch.nn.ParameterDict(
            {n.replace(".", "_"): torch.nn.Parameter(t, requires_grad=False) for n, t in tensors.items()}
        )
        self._tensors = {n: self.params[n.replace(".", "_")] for n in tensors}  # plain dict: fast lookups
        self._packed = packed
        device = weights["embed"].device
        self.cos, self.sin = rope_tables(cfg.head_dim, cfg.rope_theta, cfg.max_seq_len, device)
        self._rope_at: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []  # `_rope`

    def w(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def lin(self, name: str) -> LinearWeight:
        """A weight used through `linear` (PACKED), in its kernel's layout."""
        return self._packed[name]

    @property
    def dtype(self) -> torch.dtype:
        return self.w("embed").dtype

    @property
    def device(self) -> torch.device:
        return self.w("embed").device

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.w("embed")[tokens]  # [T, D]

    def attention(self, layer: int, h: torch.Tensor, batch: StepBatch, kv: KVCache) -> Routed:
        cfg, p = self.cfg, f"layers.{layer}."
        x = self._norm(h, self.w(p + "attn_norm"), cfg.norm_eps)
        qkv = self._linear(x, self.lin(p + "wqkv"))  # [T, q_dim + 2 kv_dim]
        T, H, K, d = qkv.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qk = qkv[:, : cfg.q_dim + cfg.kv_dim].view(T, H + K, d)
        qk = apply_rope(qk, *self._rope(batch))  # q and k in one pass
        q, k = qk.split([H, K], dim=1)  # [T, H, d], [T, K, d]
        v = qkv[:, cfg.q_dim + cfg.kv_dim:].view(T, K, d)
        kv.write(layer, batch.slot_mapping, k, v)
        attn = self._attend(q, kv.k[layer], kv.v[layer], batch)  # [T, H, d]
        h = h + self._linear(attn.flatten(1), self.lin(p + "wo"))
        x = self._norm(h, self.w(p + "ffn_norm"), cfg.norm_eps)
        ids, gates = self._route(x, self.w(p + "gate"), cfg.top_k)
        return Routed(h, x, ids, gates)

    def _rope(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, d] at the step's positions: gathered once a step, not once a layer. The last two
        batches' are kept (the two halves of a ping-pong step alternate layer by layer); each entry holds
        its positions tensor, so a later tensor cannot be mistaken for it."""
        for positions, at in self._rope_at:
            if positions is batch.positions:
                return at
        at = self.cos[batch.positions], self.sin[batch.positions]
        self._rope_at = [(batch.positions, at), *self._rope_at[:1]]
        return at

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        head = self.w("embed") if self.cfg.tie_embeddings else self.lin("lm_head")
        return self._linear(self._norm(h, self.w("norm"), self.cfg.norm_eps), head).float()  # [N, V]

    async def forward_step(self, batch: StepBatch, kv: KVCache, experts: ExpertBackend) -> torch.Tensor:
        """One engine step through every layer: next-token logits [N, V] at `batch.logits_index`."""
        h = self.embed(batch.tokens)
        for layer in range(self.cfg.n_layers):
            r = self.attention(layer, h, batch, kv)
            h = r.h + await experts(layer, r.x, r.ids, r.gates)
        return self.logits(h[batch.logits_index])

    def param_names(self) -> list[str]:
        return sorted([*self._tensors, *self._packed])

    def param_bytes(self) -> int:
        return sum(map(weight_bytes, [*self._tensors.values(), *self._packed.values()]))


def _fuse(tensors: dict[str, torch.Tensor], names: list[str], fused: str) -> None:
    """Replace `names` [N_i, D] by their concatenation `fused` [Σ N_i, D]; FP8 ones kept as stored (with
    `<name>.scale`) stay FP8 if all are, else are dequantized into the others' dtype."""
    ws = [tensors.pop(n) for n in names]
    scales = [tensors.pop(n + SCALE, None) for n in names]
    if all(s is not None for s in scales):
        tensors[fused + SCALE] = torch.cat(scales)  # type: ignore[arg-type]
    elif any(s is not None for s in scales):
        dtype = next(w.dtype for w, s in zip(ws, scales, strict=True) if s is None)
        ws = [w if s is None else (w.float() * s[:, None]).to(dtype) for w, s in zip(ws, scales, strict=True)]
    tensors[fused] = torch.cat(ws)


def load_local(
    model_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    deterministic: bool = False,
    kernels: Kernels | None = None,
    attention_kernels: Kernels | None = None,
) -> tuple[Mixtral, LocalExperts]:
    """The whole model in this process: attention side plus every expert (the parity oracle).
    `kernels` pack the experts' weights, `attention_kernels` (default: `kernels`) the attention side's."""
    cfg = MixtralConfig.load(model_dir)
    attention_kernels = attention_kernels or kernels
    attn = load_attention(model_dir, dtype=dtype, device=device,
                          keep_fp8=attention_kernels is not None and attention_kernels.fp8)
    everything = {layer: list(range(cfg.n_experts)) for layer in range(cfg.n_layers)}
    experts = load_experts(model_dir, everything, dtype=dtype, device=device,
                           keep_fp8=kernels is not None and kernels.fp8)
    model = Mixtral(cfg, attn.tensors, deterministic=deterministic, kernels=attention_kernels)
    return model, LocalExperts.from_weights(
        experts.tensors, everything, cfg.n_experts, deterministic=deterministic, kernels=kernels
    )
