"""The dispatcher: embeddings, attention, norms, routers, the KV cache and the engine loop.

It loads only the `attention` role and reaches the experts through `ShardedExperts`, over the data
plane (`transport="auto"`: shared memory on the node, TCP across; `"socket"`: TCP always) or over Ray
calls (`"ray"`). A plain class: `actors/runtime.py` runs it as a Ray actor, `deploy/serve/deployments.py`
as a Serve deployment.
Given a placement `board`, it routes with the board's placement and follows its moves
(`DispatcherFollower`, `actors/replacement.py`).
`DispatcherWatch` is for its callers: it fails their calls fast while the dispatcher is dead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import torch

from moray.actors.board import PlacementBoard
from moray.actors.dataplane.channel import ChannelSpec
from moray.actors.dataplane.directory import Directory
from moray.actors.dataplane.table import DataPlane, Transport
from moray.actors.experts import resolve_dtype
from moray.actors.faults import DispatcherUnavailableError, fault_kind
from moray.actors.logs import setup_actor_logging
from moray.actors.placement import Placement
from moray.actors.replacement import DispatcherFollower
from moray.actors.sharded import HandleLinks, Links, ShardedExperts
from moray.actors.threads import set_threads, thread_report
from moray.model.config import MixtralConfig
from moray.model.engine import AsyncEngine, EngineConfig, GenerateRequest, TokenEvent
from moray.model.kernels import KernelOptions
from moray.model.mixtral import Mixtral
from moray.model.tokenizer import Tokenizer
from moray.model.weights import load_attention

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, model_dir: str, placement: Placement, shards: Sequence[Any],
                 engine_config: EngineConfig, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
                 num_threads: int = 1, shard_timeout_s: float = 60.0, transport: Transport = "auto",
                 group: str | None = None, board: str | None = None,
                 kernels: KernelOptions = KernelOptions()) -> None:
        """With a placement `board`, the placement in force there (and every later one) replaces
        `placement`. `kernels`: the attention side's quantization and kernel choice."""
        setup_actor_logging()
        set_threads(num_threads)  # 0: all the node's cores
        cfg = MixtralConfig.load(model_dir)
        self.follower = DispatcherFollower(PlacementBoard(board)) if board else None
        version, placement = self.follower.begin(placement) if self.follower else (0, placement)
        placement.validate(cfg.n_layers, cfg.n_experts)
        self.kernels = kernels.kernels(attention=True, deterministic=engine_config.deterministic)
        weights = load_attention(model_dir, dtype=resolve_dtype(dtype), device=device,
                                 keep_fp8=self.kernels.fp8)
        self.model = Mixtral(cfg, weights.tensors, deterministic=engine_config.deterministic,
                             kernels=self.kernels)
        self.tokenizer = Tokenizer.from_model_dir(model_dir)
        links = self._links(cfg, placement, shards, engine_config, resolve_dtype(dtype), transport, group)
        self.experts = ShardedExperts(placement, links, shard_timeout_s, version)
        if self.follower is not None:
            self.follower.follow(self.experts)
        self.engine = AsyncEngine(self.model, self.experts, self.tokenizer, engine_config)
        log.info("dispatcher ready: %d layers, %d shards, %.1f MB attention weights", cfg.n_layers,
                 placement.num_shards, self.model.param_bytes() / 1e6)

    def _links(self, cfg: MixtralConfig, placement: Placement, shards: Sequence[Any], engine: EngineConfig,
               dtype: torch.dtype, transport: Transport, group: str | None) -> Links:
        if transport == "ray":
            return HandleLinks(shards)
        if not group:
            raise ValueError(f"transport {transport!r} needs the shards' data-plane group")
        spec = ChannelSpec(max_rows=engine.max_batch_tokens, dim=cfg.dim, dtype=dtype, max_slots=cfg.top_k)
        return DataPlane(Directory(group), spec, placement.num_shards, node=self.node_id(),
                         transport=transport)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        async for event in self.engine.generate(request):
            yield event

    async def generate_steps(self, requests: list[GenerateRequest]) -> AsyncIterator[list[TokenEvent]]:
        """Several requests as one stream, one item per engine step (what the served ingress calls: a
        request's n choices cost one streamed message a step, not n)."""
        async for events in self.engine.generate_steps(requests):
            yield events

    async def complete(self, request: GenerateRequest) -> list[TokenEvent]:
        """The whole generation at once (for callers that do not stream)."""
        return [event async for event in self.engine.generate(request)]

    def stats(self) -> dict[str, Any]:
        return {**self.engine.stats(), **self.experts.stats(), "param_bytes": self.model.param_bytes(),
                "kernels": self.kernels.report(),
                "param_names": self.model.param_names(), "pid": os.getpid(), **thread_report()}

    def close(self) -> None:
        """Leave the placement board (a coordinator stops waiting for this dispatcher) and close the data
        plane's channels (idempotent)."""
        follower, self.follower = getattr(self, "follower", None), None
        if follower is not None:
            follower.stop()
        experts = getattr(self, "experts", None)
        if experts is not None and isinstance(experts.links, DataPlane):
            experts.links.close()

    def __del__(self) -> None:
        self.close()

    def node_id(self) -> str | None:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def check_health(self) -> None:
        task = self.engine._task
        if task is not None and task.done() and task.exception() is not None:
            raise RuntimeError(f"engine loop died: {task.exception()!r}")


# ---- callers' side: a dead dispatcher fails fast ------------------------------------------------------
PROBE_TIMEOUT_S = 2.0  # one probe call of a dispatcher believed dead
PROBE_PAUSE_S = 0.5  # between probes
__all__ = ["Dispatcher", "DispatcherUnavailableError", "DispatcherWatch", "actor_died"]


def actor_died(e: BaseException) -> bool:
    """A Ray/Serve error saying the replica a call went to is gone (not an error raised inside it, such as
    a shard that timed out: a `RayTaskError`)."""
    return fault_kind(e) == "died"


class DispatcherWatch:
    """Refuses calls at once while the dispatcher is known to be dead.

    A call failing with `actor_died` marks it down; a task then probes it (`probe()`, a cheap call
    through the same handle) until one answers within `PROBE_TIMEOUT_S`, that is until Serve has a
    live replica again, and marks it up. Without this, new calls would wait in Serve's router for
    the replacement. A call that is merely slow never marks it down.
    """

    def __init__(self, probe: Callable[[], Awaitable[Any]]) -> None:
        self.probe = probe
        self.down_since: float | None = None
        self._task: asyncio.Task[None] | None = None

    def check(self) -> None:
        if self.down_since is not None:
            raise DispatcherUnavailableError(
                f"the dispatcher died {time.monotonic() - self.down_since:.1f} s ago and is restarting")

    def failed(self, e: BaseException) -> None:
        """Note a failed call (any error: only `actor_died` ones count)."""
        if self.down_since is None and actor_died(e):
            log.warning("a dispatcher replica died (%s); refusing calls until one answers", type(e).__name__)
            self.down_since = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(self._until_back())

    async def _until_back(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.probe(), PROBE_TIMEOUT_S)  # type: ignore[arg-type]
                break
            except Exception as e:  # noqa: BLE001 - dead, restarting or slow: probe again
                log.debug("dispatcher probe: %s", type(e).__name__)
                await asyncio.sleep(PROBE_PAUSE_S)
        log.info("the dispatcher answers again after %.1f s", time.monotonic() - (self.down_since or 0.0))
        self.down_since = None
