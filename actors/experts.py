"""An expert shard: the experts `P[shard]` of every layer, loaded straight from the checkpoint.

A plain class, so the same object runs as a Ray actor (`actors/runtime.py`) and inside a Serve
deployment (`deploy/serve/deployments.py`). It never reads attention weights nor other shards' experts.

Given a data-plane `group`, it opens a `ShardEndpoint` (`actors/endpoint.py`) and announces it in the
`Directory`; dispatchers then send its rows over shared memory or TCP instead of calling `serve`
through Ray. `close()` (Serve calls `__del__` when it stops a replica) retracts the announcement and
drains the channels first.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence

import torch

from moray.actors.directory import Directory
from moray.actors.endpoint import ShardEndpoint
from moray.actors.frames import Limits
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
                 dtype: str | torch.dtype = "float32", device: str = "cpu", num_threads: int = 1,
                 group: str | None = None, deterministic: bool = False) -> None:
        setup_actor_logging()
        torch.set_num_threads(num_threads)
        self.shard_id, self.device = shard_id, torch.device(device)
        self.cfg = MixtralConfig.load(model_dir)
        experts = {int(layer): sorted(ids) for layer, ids in experts.items()}
        loaded = load_experts(model_dir, experts, dtype=resolve_dtype(dtype), device=self.device)
        self.banks = {layer: ExpertBank.from_weights(loaded.tensors, layer, ids, self.cfg.n_experts,
                                                     deterministic=deterministic)
                      for layer, ids in experts.items()}
        self.experts = experts
        self.held = torch.zeros(self.cfg.n_layers, self.cfg.n_experts + 1, dtype=torch.bool)  # [L, 1 + E]
        self.held[:, 0] = True  # padding slots (-1)
        for layer, ids in experts.items():
            self.held[layer, torch.tensor(ids, dtype=torch.long) + 1] = True
        self.tokens_served = torch.zeros(self.cfg.n_layers, self.cfg.n_experts, dtype=torch.long)
        self.busy_s = 0.0
        self._seen: set[str] = set()
        log.info("expert shard %d holds %s (%.1f MB)", shard_id, _describe(experts), self.param_bytes() / 1e6)
        self.replica = uuid.uuid4().hex[:12]
        self.endpoint: ShardEndpoint | None = None
        self.directory = Directory(group) if group else None
        if self.directory is not None:
            self._open_endpoint(resolve_dtype(dtype))

    def _open_endpoint(self, dtype: torch.dtype) -> None:
        assert self.directory is not None
        limits = Limits(max_rows=0, dim=self.cfg.dim, dtype=dtype, num_layers=self.cfg.n_layers,
                        max_slots=self.cfg.top_k)
        self.endpoint = ShardEndpoint(self.serve, limits, host=_node_address())
        self.directory.announce(self.shard_id, self.replica, {**self.endpoint.address(), "node": _node_id()})
        log.info("expert shard %d replica %s takes channels on tcp %s:%d and shared memory",
                 self.shard_id, self.replica, self.endpoint.host, self.endpoint.port)

    def close(self, drain_s: float = 3.0) -> None:
        """Leave the data plane: retract the endpoint, let dispatchers close their channels, stop."""
        endpoint, self.endpoint = getattr(self, "endpoint", None), None
        if endpoint is None:
            return
        try:
            if self.directory is not None:
                self.directory.retract(self.shard_id, self.replica)
        except Exception as e:  # noqa: BLE001 - the cluster is going away too
            log.debug("could not retract the endpoint: %s", e)
        left = endpoint.drain(drain_s)
        endpoint.close()
        log.info("expert shard %d replica %s left the data plane (%d channel(s) still open)", self.shard_id,
                 self.replica, left)

    def __del__(self) -> None:
        self.close()

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
        if not bool(self.held[layer][expert_ids.cpu() + 1].all()):
            asked = sorted(set(expert_ids.flatten().tolist()))
            raise ValueError(f"expert shard {self.shard_id} does not hold every expert asked of it in layer "
                             f"{layer}: {asked}, holds {self.experts.get(layer)}")
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
        return {
            "shard_id": self.shard_id,
            "replica": self.replica,
            "pid": os.getpid(),
            "node_id": _node_id(),
            "channels": self.endpoint.connected() if self.endpoint else None,
            "experts": self.experts,
            "param_bytes": self.param_bytes(),
            "busy_s": self.busy_s,
        }


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _node_address() -> str:
    """The address other nodes reach this one on (Ray's node IP; loopback outside Ray)."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def _describe(experts: Mapping[int, Sequence[int]]) -> str:
    layouts = {tuple(ids) for ids in experts.values()}
    if len(layouts) == 1:
        return f"experts {list(layouts.pop())} of {len(experts)} layers"
    return f"{sum(len(v) for v in experts.values())} (layer, expert) pairs"
