"""An expert shard: the experts `P[shard]` of every layer, loaded straight from the checkpoint.

A plain class, so the same object runs as a Ray actor (`actors/runtime.py`) and inside a Serve
deployment (`deploy/serve/deployments.py`). It never reads attention weights nor other shards' experts.

Given a data-plane `group`, it opens a `ShardEndpoint` (`actors/dataplane/endpoint.py`) and announces it
in the `Directory`, again every few seconds (`Heartbeat`); dispatchers then send its rows over shared
memory or TCP instead of calling `serve` through Ray. `close()` (Serve calls `__del__` when it stops a
replica) retracts the announcement and drains the channels first. `check_health()` (Serve's health check)
fails while an expert call has been computing for longer than `HUNG_CALL_S`.

Given a placement `board` (`actors/board.py`), the experts it holds follow the board while it serves
(`ShardFollower`, `actors/replacement.py`): `hold()` loads only the experts gained, from the checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moray.actors.board import PlacementBoard
from moray.actors.dataplane.directory import Directory, Heartbeat
from moray.actors.dataplane.endpoint import ShardEndpoint
from moray.actors.dataplane.frames import Limits
from moray.actors.logs import setup_actor_logging
from moray.actors.replacement import ShardFollower
from moray.actors.threads import set_threads, thread_report
from moray.model.config import MixtralConfig
from moray.model.experts import ExpertBank
from moray.model.kernels import KernelOptions
from moray.model.weights import load_experts

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUNG_CALL_S = 30.0  # an expert call computing this long means a hung device: the health check fails


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]


@dataclass(frozen=True)
class Holding:
    """What a shard replica serves: its experts (layer -> ids), their banks, the held mask [L, 1 + E] and
    the placement-board tag they answer ("3", or "3+4" while a move holds old and new: `actors/board.py`).
    Replaced whole (`ExpertShard.hold`), so a call reads one consistent holding."""

    experts: dict[int, list[int]]
    banks: dict[int, ExpertBank]
    held: torch.Tensor
    tag: str = ""


class ExpertShard:
    def __init__(self, model_dir: str, shard_id: int, experts: Mapping[int, Sequence[int]], *,
                 dtype: str | torch.dtype = "float32", device: str = "cpu", num_threads: int = 1,
                 group: str | None = None, deterministic: bool = False, board: str | None = None,
                 kernels: KernelOptions = KernelOptions()) -> None:
        """`experts` is what to hold without a placement `board`; with one, the board says (a replica
        that starts during a move loads the old and the new experts of its shard). `kernels`: quantization
        and kernel choice; this replica quantizes (and probes kernels for) only the experts it holds."""
        setup_actor_logging()
        set_threads(num_threads)  # 0: all the node's cores
        self.shard_id, self.device = shard_id, torch.device(device)
        self.model_dir, self.dtype, self.deterministic = model_dir, resolve_dtype(dtype), deterministic
        self.cfg = MixtralConfig.load(model_dir)
        fp8_checkpoint = self.cfg.checkpoint_quant is not None
        self.kernels = kernels.for_checkpoint(fp8_checkpoint, device).kernels(deterministic=deterministic)
        self.replica = uuid.uuid4().hex[:12]
        self.holding = Holding({}, {}, _held_mask(self.cfg.n_layers, self.cfg.n_experts, {}))
        self.follower = ShardFollower(PlacementBoard(board), self) if board else None
        tag, wanted = self.follower.begin(experts) if self.follower else ("", experts)
        self.hold(wanted, tag)
        self.tokens_served = torch.zeros(self.cfg.n_layers, self.cfg.n_experts, dtype=torch.long)
        self.busy_s = 0.0
        self._seen: set[str] = set()
        log.info("expert shard %d holds %s (%.1f MB resident, %s)", shard_id, _describe(self.experts),
                 self.param_bytes() / 1e6, self.quantization)
        self.endpoint: ShardEndpoint | None = None
        self.heartbeat: Heartbeat | None = None
        self.directory = Directory(group) if group else None
        if self.directory is not None:
            self._open_endpoint(self.dtype)
        if self.follower is not None:
            self.follower.start()

    @property
    def experts(self) -> dict[int, list[int]]:
        return self.holding.experts

    @property
    def banks(self) -> dict[int, ExpertBank]:
        return self.holding.banks

    @property
    def held(self) -> torch.Tensor:
        return self.holding.held

    def hold(self, experts: Mapping[int, Sequence[int]], tag: str = "") -> None:
        """Hold exactly `experts` (layer -> ids): read only the ones not held yet from the checkpoint, keep
        the others' packed weights as they are, and let go of the rest (freed once no call uses them).
        Peak extra memory: the experts gained. Raises (holding what it held) if a load fails."""
        old = self.holding
        wanted = {int(layer): sorted({int(e) for e in ids}) for layer, ids in experts.items() if ids}
        gained = {layer: [e for e in ids if e not in old.experts.get(layer, ())]
                  for layer, ids in wanted.items()}
        gained = {layer: ids for layer, ids in gained.items() if ids}
        loaded = {}
        if gained:
            loaded = load_experts(self.model_dir, gained, dtype=self.dtype, device=self.device,
                                  keep_fp8=self.kernels.fp8).tensors
        banks = {layer: self._bank(old.banks.get(layer), loaded, layer, gained.get(layer, []), ids)
                 for layer, ids in wanted.items()}
        self.holding = Holding(wanted, banks, _held_mask(self.cfg.n_layers, self.cfg.n_experts, wanted), tag)
        if old.experts:
            dropped = sum(len(set(ids) - set(wanted.get(layer, ()))) for layer, ids in old.experts.items())
            log.info("expert shard %d replica %s holds placement %s: %d (layer, expert) pairs loaded, %d let "
                     "go, %.1f MB", self.shard_id, self.replica, tag or "-", sum(map(len, gained.values())),
                     dropped, self.param_bytes() / 1e6)

    def _bank(self, old: ExpertBank | None, loaded: Mapping[str, torch.Tensor], layer: int, gained: list[int],
              ids: list[int]) -> ExpertBank:
        """Layer `layer`'s bank of `ids`: the kept experts of `old` and the `gained` ones, one bank each
        (where `pack_linear` keeps weights as they are, GPU or bf16, a bank's weights are views of one
        stacked tensor: an expert let go later would stay allocated with the stack)."""
        n, det = self.cfg.n_experts, self.deterministic
        new = [ExpertBank.from_weights(loaded, layer, [e], n, deterministic=det, kernels=self.kernels)
               for e in gained]
        parts = [b for b in (old, *new) if b is not None]
        if len(parts) == 1 and parts[0].expert_ids == ids:
            return parts[0]
        return ExpertBank.combine(parts, ids, self.cfg.n_experts)

    def _open_endpoint(self, dtype: torch.dtype) -> None:
        assert self.directory is not None
        limits = Limits(max_rows=0, dim=self.cfg.dim, dtype=dtype, num_layers=self.cfg.n_layers,
                        max_slots=self.cfg.top_k)
        self.endpoint = ShardEndpoint(self.serve, limits, host=_node_address())
        self.heartbeat = Heartbeat(self.directory, self.shard_id, self.replica,
                                   {**self.endpoint.address(), "node": _node_id()})
        log.info("expert shard %d replica %s takes channels on tcp %s:%d and shared memory",
                 self.shard_id, self.replica, self.endpoint.host, self.endpoint.port)

    def close(self, drain_s: float = 3.0) -> None:
        """Leave the data plane: retract the endpoint, let dispatchers close their channels, stop."""
        follower, self.follower = getattr(self, "follower", None), None
        if follower is not None:
            follower.stop()
        endpoint, self.endpoint = getattr(self, "endpoint", None), None
        if endpoint is None:
            return
        heartbeat, self.heartbeat = getattr(self, "heartbeat", None), None
        try:
            if heartbeat is not None:
                heartbeat.stop()  # and retract: no dispatcher dials it any more
        except Exception as e:  # noqa: BLE001 - the cluster is going away too
            log.debug("could not retract the endpoint: %s", e)
        left = endpoint.drain(drain_s)
        endpoint.close()
        log.info("expert shard %d replica %s left the data plane (%d channel(s) still open)", self.shard_id,
                 self.replica, left)

    def __del__(self) -> None:
        self.close()

    def check_health(self) -> None:
        """Raise if the data plane cannot serve: its endpoint stopped accepting, or an expert call has been
        computing for more than `HUNG_CALL_S` (Serve's health check: a replica that fails it is replaced)."""
        if self.endpoint is not None:
            self.endpoint.check_health(HUNG_CALL_S)

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
        holding = self.holding  # one consistent set of experts for the whole call
        ids_np = expert_ids.detach().to("cpu", torch.long).numpy()  # index checks in numpy: a few µs
        if not holding.held.numpy()[layer][ids_np + 1].all():
            asked = sorted(set(ids_np.flatten().tolist()))
            raise ValueError(f"expert shard {self.shard_id} does not hold every expert asked of it in layer "
                             f"{layer}: {asked}, holds {holding.experts.get(layer)} (placement "
                             f"{holding.tag})")
        ids = expert_ids.to(self.device)
        y = holding.banks[layer](x.to(self.device), ids, gates.to(self.device)).to(out_device)
        counts = torch.from_numpy(np.bincount(ids_np[ids_np >= 0], minlength=self.cfg.n_experts))  # [E]
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
        """Resident bytes of the experts held, as held (int8 ones: their int8 values and scales)."""
        return sum(bank.param_bytes() for bank in self.banks.values())

    def reset_counts(self) -> None:
        """Start the per-(layer, expert) token counters from zero."""
        self.tokens_served.zero_()

    @property
    def quantization(self) -> str:
        """What the experts are held as: "int8", "fp8" or the serving dtype."""
        return self.kernels.quantization or str(self.dtype).removeprefix("torch.")

    def info(self) -> dict[str, object]:
        return {
            "shard_id": self.shard_id,
            "replica": self.replica,
            "pid": os.getpid(),
            "node_id": _node_id(),
            "channels": self.endpoint.connected() if self.endpoint else None,
            "experts": self.experts,
            "param_bytes": self.param_bytes(),
            "quantization": self.quantization,
            "kernels": self.kernels.report(),
            "placement": self.holding.tag,
            "busy_s": self.busy_s,
            **thread_report(),
        }


def _held_mask(num_layers: int, num_experts: int, experts: Mapping[int, Sequence[int]]) -> torch.Tensor:
    """[L, 1 + E]: True where (layer, expert) is held; column 0 (padding slots, id -1) always."""
    held = torch.zeros(num_layers, num_experts + 1, dtype=torch.bool)
    held[:, 0] = True
    for layer, ids in experts.items():
        held[layer, torch.tensor(list(ids), dtype=torch.long) + 1] = True
    return held


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
