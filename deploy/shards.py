"""The runtime's classes as Serve deployments: load reporting, Prometheus metrics, replica-aware splits.

`ServedExpertShard` adds to `ExpertShard` a sliding window of tokens served per (layer, expert),
which it reports to Serve's autoscaler (`record_autoscaling_stats`, tokens routed per second) and
to Prometheus (`moray_expert_tokens_total{layer,expert,shard}`). `ServedDispatcher` adds to
`Dispatcher` the engine gauges and step-phase histograms, and keeps `ShardedExperts.replicas` in
step with Serve's live replica counts so a hot shard's rows are split over all its replicas.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moray.actors.dispatcher import Dispatcher
from moray.actors.experts import ExpertShard
from moray.deploy import metrics
from moray.deploy.autoscaling import TokenWindow

log = logging.getLogger(__name__)

FLUSH_S = 1.0  # how often counters go to Prometheus (per-call metric updates cost more than the call)
REFRESH_S = 2.0  # how often the dispatcher re-reads replica counts from Serve


class ServedExpertShard(ExpertShard):
    def __init__(self, model_dir: str, shard_id: int, experts: Mapping[int, Sequence[int]], **kwargs: Any) -> None:
        super().__init__(model_dir, shard_id, experts, **kwargs)
        self.window = TokenWindow()
        self._pending: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self._flushed = time.monotonic()

    def on_served(self, layer: int, counts: torch.Tensor) -> None:
        per_expert = counts.tolist()
        self.window.record(layer, per_expert)
        with self._lock:
            for expert, n in enumerate(per_expert):
                if n:
                    self._pending[(layer, expert)] = self._pending.get((layer, expert), 0) + n
        if time.monotonic() - self._flushed > FLUSH_S:
            self.flush_metrics()

    def flush_metrics(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._flushed = time.monotonic()
        metrics.record_expert_tokens(self.shard_id, pending)

    def record_autoscaling_stats(self) -> dict[str, float]:
        self.flush_metrics()
        return self.window.stats()

    def token_rates(self) -> dict[str, float]:
        return self.window.stats()


class ServedDispatcher(Dispatcher):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refresher: asyncio.Task[None] | None = None
        self._last_times = dict(vars(self.engine.times))

    async def generate(self, request: Any) -> Any:  # type: ignore[override]
        self._ensure_refresher()
        async for event in super().generate(request):
            yield event

    def _ensure_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh_replicas)
                self.export_metrics()
            except Exception as e:  # noqa: BLE001 - metrics must never break serving
                log.debug("replica refresh failed: %s", e)
            await asyncio.sleep(REFRESH_S)

    def refresh_replicas(self) -> list[int]:
        """Live replicas of every expert-shard deployment, from Serve's status."""
        from ray import serve

        app = serve.get_replica_context().app_name
        deployments = serve.status().applications[app].deployments
        for s in range(len(self.experts.replicas)):
            states = deployments[f"expert-shard-{s}"].replica_states
            self.experts.replicas[s] = max(1, int(states.get("RUNNING", 1)))
            metrics.set_shard_replicas(s, self.experts.replicas[s])
        return list(self.experts.replicas)

    def export_metrics(self) -> None:
        stats = self.engine.stats()
        metrics.set_engine_gauges(int(stats["waiting"]), int(stats["running"]), int(stats["kv_blocks_used"]),
                                  int(stats["kv_blocks_free"]))
        now = dict(vars(self.engine.times))
        steps = now["steps"] - self._last_times["steps"]
        if steps:
            for phase, key in (("attention", "attention"), ("transport", "experts"), ("sampling", "sampling")):
                metrics.observe_step(phase, (now[key] - self._last_times[key]) / steps)
        self._last_times = now
