"""The dispatcher: embeddings, attention, norms, routers, the KV cache and the engine loop.

It loads only the `attention` role and reaches the experts through `ShardedExperts`. A plain
class: `actors/runtime.py` runs it as a Ray actor, `deploy/app.py` as a Serve deployment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch

from moray.actors.experts import resolve_dtype
from moray.actors.logs import setup_actor_logging
from moray.actors.placement import Placement
from moray.actors.transport import ShardedExperts
from moray.model.config import MixtralConfig
from moray.model.engine import AsyncEngine, EngineConfig, GenerateRequest, TokenEvent
from moray.model.mixtral import Mixtral
from moray.model.tokenizer import Tokenizer
from moray.model.weights import load_attention

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, model_dir: str, placement: Placement, shards: Sequence[Any],
                 engine_config: EngineConfig, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
                 num_threads: int = 1, shard_timeout_s: float = 60.0) -> None:
        setup_actor_logging()
        torch.set_num_threads(num_threads)
        cfg = MixtralConfig.load(model_dir)
        placement.validate(cfg.n_layers, cfg.n_experts)
        weights = load_attention(model_dir, dtype=resolve_dtype(dtype), device=device)
        self.model = Mixtral(cfg, weights.tensors)
        self.tokenizer = Tokenizer.from_model_dir(model_dir)
        self.experts = ShardedExperts(placement, shards, shard_timeout_s)
        self.engine = AsyncEngine(self.model, self.experts, self.tokenizer, engine_config)
        log.info("dispatcher ready: %d layers, %d shards, %.1f MB attention weights", cfg.n_layers,
                 placement.num_shards, self.model.param_bytes() / 1e6)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        async for event in self.engine.generate(request):
            yield event

    async def complete(self, request: GenerateRequest) -> list[TokenEvent]:
        """The whole generation at once (for callers that do not stream)."""
        return [event async for event in self.engine.generate(request)]

    def stats(self) -> dict[str, Any]:
        return {**self.engine.stats(), **self.experts.stats(), "param_bytes": self.model.param_bytes(),
                "param_names": sorted(self.model.params.keys()), "pid": os.getpid()}

    def node_id(self) -> str | None:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def check_health(self) -> None:
        task = self.engine._task
        if task is not None and task.done() and task.exception() is not None:
            raise RuntimeError(f"engine loop died: {task.exception()!r}")
