"""The runtime's classes as Serve deployments: load reporting, Prometheus metrics, replica-aware splits.

`ServedExpertShard` adds to `ExpertShard` a sliding window of tokens served per (layer, expert),
which it reports to Serve's autoscaler (`record_autoscaling_stats`, tokens routed per second) and
to Prometheus (`moray_expert_tokens_total{layer,expert,shard}`). `ServedDispatcher` adds to
`Dispatcher` the engine gauges, the step-phase and transport histograms, and keeps
`ShardedExperts.replicas` in step with Serve's live replica counts so a hot shard's rows are split
over all its replicas (each chunk then goes to the least-loaded replica: `router.py`), and exports the
expert calls' faults (`moray_shard_faults_total`). A shard replica's health check (`check_health`,
`actors/experts.py`) looks into its data-plane endpoint: Serve replaces one that hangs.

Both follow the app's placement board (online expert re-placement, `actors/replacement.py`); every
dispatcher replica carries an `AppRebalancer` (`rebalancer.py`): the balancedness gauges, `moray
rebalance`, and moves every `rebalance_interval_s` when set.

Every shard replica describes its load in `load_report()`, which is also its `record_routing_stats()`:
Serve polls it for the routers, and `moray status` reads it from each replica actor (`state.py`).
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
from moray.actors.sharded import HandleLinks
from moray.deploy.serve import metrics, state
from moray.deploy.serve.autoscaling import TokenWindow
from moray.deploy.serve.rebalancer import AppRebalancer, RebalancePolicy

log = logging.getLogger(__name__)

FLUSH_S = 1.0  # how often counters go to Prometheus (per-call metric updates cost more than the call)
REFRESH_S = 2.0  # how often the dispatcher re-reads replica counts from Serve and exports its metrics
# (`metrics.STEP_PHASES` phase, `StepTimes` field it is read from)
STEP_PHASE_TIMES = (("attention", "attention"), ("transport", "experts"), ("sampling", "sampling"))


class ServedExpertShard(ExpertShard):
    def __init__(self, model_dir: str, shard_id: int, experts: Mapping[int, Sequence[int]],
                 **kwargs: Any) -> None:
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

    def load_report(self) -> dict[str, Any]:
        """This replica's load: identity, tokens/s over the window, and cumulative tokens served per
        (layer, expert) as sparse `[layer, expert, n]` rows (its own experts only)."""
        served = self.tokens_served  # [L, E]
        rows = [[lay, e, int(served[lay, e])] for lay, e in served.nonzero().tolist()]
        rates = [[lay, e, r] for (lay, e), r in sorted(self.window.rates().items())]
        return {"shard": self.shard_id, "replica": _replica_id(), "num_layers": self.cfg.n_layers,
                "num_experts": self.cfg.n_experts, "tokens_per_s": self.window.rate(),
                "tokens_total": int(served.sum()), "tokens": rows, "rates": rates,
                "placement": self.holding.tag, "experts": self.experts, "param_bytes": self.param_bytes()}

    def record_routing_stats(self) -> dict[str, Any]:
        """What Serve hands the request routers (`RunningReplica.routing_stats`)."""
        return self.load_report()


def _replica_id() -> str | None:
    """Serve's id of the replica this runs in (None outside Serve)."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - not in a replica (a plain actor, a test)
        return None


class ServedDispatcher(Dispatcher):
    def __init__(self, *args: Any, rebalance: RebalancePolicy | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rebalancer: AppRebalancer | None = None
        if self.follower is not None:  # balancedness gauges always; moves every interval if configured
            self.rebalancer = AppRebalancer(self.follower.board, rebalance or RebalancePolicy())
            self.rebalancer.start()
        self._refresher: asyncio.Task[None] | None = None
        self._last_times = dict(vars(self.engine.times))
        self._last_calls: list[tuple[int, float]] = [(0, 0.0)] * self.experts.placement.num_shards
        self._last_faults: dict[tuple[int, str], int] = {}

    async def generate(self, request: Any) -> Any:  # type: ignore[override]
        self._ensure_refresher()
        async for event in super().generate(request):
            yield event

    async def generate_steps(self, requests: Any) -> Any:  # type: ignore[override]
        self._ensure_refresher()
        async for events in super().generate_steps(requests):
            yield events

    async def rebalance(self, dry_run: bool = False, redundant: int | None = None,
                        margin: float | None = None) -> dict[str, Any]:
        """Re-place the experts now from the shards' load (`moray rebalance`): the `MoveResult` as a dict."""
        if self.rebalancer is None:
            raise RuntimeError("this app has no placement board (built without one)")
        result = await asyncio.to_thread(self.rebalancer.once, dry_run=dry_run, redundant=redundant,
                                         margin=margin)
        return result.to_dict()

    def close(self) -> None:
        rebalancer = getattr(self, "rebalancer", None)
        if rebalancer is not None:
            rebalancer.stop()
        super().close()

    def _ensure_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            try:
                if isinstance(self.experts.links, HandleLinks):
                    await asyncio.to_thread(self.refresh_replicas)  # asks Serve: off the event loop
                else:
                    self.refresh_replicas()
                self.export_metrics()
            except Exception as e:  # noqa: BLE001 - metrics must never break serving
                log.debug("replica refresh failed: %s", e)
            await asyncio.sleep(REFRESH_S)

    def refresh_replicas(self) -> list[int]:
        """Live replicas of every expert-shard deployment, into `moray_shard_replicas`. Over the data
        plane: the replicas this dispatcher has a usable channel to (it finds their endpoints in its
        directory by itself), counted here without a call out: Serve's status builds and pickles its
        config models in this process, tens of ms holding the GIL the engine's loop needs. Over Serve
        handles (transport "ray"): Serve's count of running replicas, and a shard's rows are split into
        one call per replica."""
        links, num_shards = self.experts.links, self.experts.placement.num_shards
        if isinstance(links, HandleLinks):
            from ray import serve

            app = serve.get_replica_context().app_name
            running = [max(1, n) for n in state.running_replicas(app, num_shards)]
            links.replicas[:] = running
        else:
            running = [len(links.links(s)) for s in range(num_shards)]
        for s, n in enumerate(running):
            metrics.set_shard_replicas(s, n)
        return running

    def export_metrics(self) -> None:
        """Engine gauges, each step phase's mean time and each shard's mean expert-call round trip
        since the last export (from the engine's `times` and `ShardedExperts.stats()` counters)."""
        stats = self.engine.stats()
        metrics.set_engine_gauges(int(stats["waiting"]), int(stats["running"]), int(stats["kv_blocks_used"]),
                                  int(stats["kv_blocks_free"]))
        now = dict(vars(self.engine.times))
        steps = now["steps"] - self._last_times["steps"]
        if steps:
            for phase, key in STEP_PHASE_TIMES:
                metrics.observe_step(phase, (now[key] - self._last_times[key]) / steps)
        self._last_times = now
        self._export_transport()

    def _export_transport(self) -> None:
        calls = self.experts.stats()  # "shard_calls", "shard_call_s": lists indexed by shard
        pairs = zip(calls["shard_calls"], calls["shard_call_s"], self._last_calls, strict=False)
        for shard, (n, s, (n0, s0)) in enumerate(pairs):
            if n > n0:
                metrics.observe_transport(shard, (s - s0) / (n - n0))
        self._last_calls = list(zip(calls["shard_calls"], calls["shard_call_s"], strict=True))
        for shard, kind, n in calls["shard_faults"]:  # [shard, kind, faults so far]
            seen = self._last_faults.get((shard, kind), 0)
            if n > seen:
                metrics.record_shard_faults(shard, kind, n - seen)
                self._last_faults[(shard, kind)] = n
