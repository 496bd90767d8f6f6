"""An expert shard: the experts `P[shard]` of every layer, loaded straight from the checkpoint.

A plain class, so the same object runs as a Ray actor (`actors/runtime.py`) and inside a Serve
deployment (`deploy/app.py`). It never reads attention weights nor other shards' experts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence

import torch

from moray.actors.logs import setup_actor_logging
from moray.model.config import MixtralConfig
from moray.model.experts import ExpertBank
from moray.model.weights import load_experts

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]


class ExpertShard:
    def __init__(self, model_dir: str, shard_id: int, experts: Mapping[int, Sequence[int]], *,
                 dtype: str | torch.dtype = "float32", device: str = "cpu", num_threads: int = 1) -> None:
        setup_actor_logging()
        torch.set_num_threads(num_threads)
        self.shard_id, self.device = shard_id, torch.device(device)
        self.cfg = MixtralConfig.load(model_dir)
        experts = {int(layer): sorted(ids) for layer, ids in experts.items()}
        loaded = load_experts(model_dir, experts, dtype=resolve_dtype(dtype), device=self.device)
        self.banks = {layer: ExpertBank.from_weights(loaded.tensors, layer, ids, self.cfg.n_experts)
                      for layer, ids in experts.items()}
        self.experts = experts
        self.tokens_served = torch.zeros(self.cfg.n_layers, self.cfg.n_experts, dtype=torch.long)
        self.busy_s = 0.0
        self._seen: set[str] = set()
        log.info("expert shard %d holds %s (%.1f MB)", shard_id, _describe(experts), self.param_bytes() / 1e6)

    def serve(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
              request_ids: Sequence[str] = ()) -> torch.Tensor:
        """One `ExpertRequest`: y [n, D] = Σ_j gates[:, j] · SwiGLU_{expert_ids[:, j]}(x).

        `request_ids` (sent with a step's first layer) name the requests in the step; each one is
        logged once, when it first reaches this replica.
        """
        if request_ids:
            joined = [r for r in request_ids if r not in self._seen]
            if joined:
                log.info("expert shard %d: requests joined: %s", self.shard_id, ", ".join(map(repr, joined)))
            self._seen = set(request_ids)
        t = time.perf_counter()
        out_device = x.device
        ids = expert_ids.to(self.device)
        y = self.banks[layer](x.to(self.device), ids, gates.to(self.device)).to(out_device)
        counts = torch.bincount(ids[ids >= 0].cpu(), minlength=self.cfg.n_experts)  # [E]
        self.tokens_served[layer] += counts
        self.busy_s += time.perf_counter() - t
        self.on_served(layer, counts)
        return y

    def on_served(self, layer: int, counts: torch.Tensor) -> None:
        """Hook for the serving layer (sliding-window rates, Prometheus); counts [E] of this call."""

    def token_counts(self) -> list[list[int]]:
        """Tokens served so far per [layer][expert] (zeros for experts held elsewhere)."""
        return self.tokens_served.tolist()

    def param_bytes(self) -> int:
        return sum(bank.param_bytes() for bank in self.banks.values())

    def info(self) -> dict[str, object]:
        import ray

        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        return {
            "shard_id": self.shard_id,
            "pid": os.getpid(),
            "node_id": ctx.get_node_id() if ctx else None,
            "experts": self.experts,
            "param_bytes": self.param_bytes(),
            "busy_s": self.busy_s,
        }


def _describe(experts: Mapping[int, Sequence[int]]) -> str:
    layouts = {tuple(ids) for ids in experts.values()}
    if len(layouts) == 1:
        return f"experts {list(layouts.pop())} of {len(experts)} layers"
    return f"{sum(len(v) for v in experts.values())} (layer, expert) pairs"
