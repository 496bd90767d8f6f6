"""The runtime's classes as Serve deployments: load reporting, Prometheus metrics, replica-aware splits.

`ServedExpertShard` adds to `ExpertShard` a sliding window of tokens served per (layer, expert),
which it reports to Serve's autoscaler (`record_autoscaling_stats`, tokens routed per second) and
to Prometheus (`moray_expert_tokens_total{layer,expert,shard}`). `ServedDispatcher` adds to
`Dispatcher` the engine gauges and step-phase histograms, and keeps `ShardedExperts.replicas` in
step with Serve's live replica counts so a hot shard's rows are split over all its replicas.

Each chunk of a split goes to the least-loaded replica: `LeastLoadedRouter` is a Serve request
router (`ray.serve.request_router`, set on the shard deployments with `shard_router_config()`)
that picks the replica with the fewest calls in flight from this dispatcher. Serve's default
power-of-two router only counts a call once it is sent, so two chunks routed at the same moment
often land on the same replica; this one counts each choice as it makes it.

Every replica describes its load in `load_report()`, which is also its `record_routing_stats()`:
Serve polls it for the routers, and `moray status` reads it from each replica actor.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
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

    def token_rates(self) -> dict[str, float]:
        return self.window.stats()

    def load_report(self) -> dict[str, Any]:
        """This replica's load: identity, tokens/s over the window, and cumulative tokens served per
        (layer, expert) as sparse `[layer, expert, n]` rows (its own experts only)."""
        served = self.tokens_served  # [L, E]
        rows = [[lay, e, int(served[lay, e])] for lay, e in served.nonzero().tolist()]
        rates = [[lay, e, r] for (lay, e), r in sorted(self.window.rates().items())]
        return {"shard": self.shard_id, "replica": _replica_id(), "num_layers": self.cfg.n_layers,
                "num_experts": self.cfg.n_experts, "tokens_per_s": self.window.rate(),
                "tokens_total": int(served.sum()), "tokens": rows, "rates": rates}

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
            running = sum(n for state, n in states.items() if getattr(state, "value", state) == "RUNNING")
            self.experts.replicas[s] = max(1, running)
            metrics.set_shard_replicas(s, self.experts.replicas[s])
        return list(self.experts.replicas)

    def export_metrics(self) -> None:
        stats = self.engine.stats()
        metrics.set_engine_gauges(int(stats["waiting"]), int(stats["running"]), int(stats["kv_blocks_used"]),
                                  int(stats["kv_blocks_free"]))
        now = dict(vars(self.engine.times))
        steps = now["steps"] - self._last_times["steps"]
        if steps:
            phases = (("attention", "attention"), ("transport", "experts"), ("sampling", "sampling"))
            for phase, key in phases:
                metrics.observe_step(phase, (now[key] - self._last_times[key]) / steps)
        self._last_times = now


# ---- routing a shard's chunks: least-loaded replica first -------------------------------------------
CHOICE_TTL_S = 5.0  # a choice never followed by a send (the call was cancelled) stops counting


def _router_bases() -> tuple[type, ...]:
    from ray.serve.request_router import FIFOMixin, RequestRouter

    return FIFOMixin, RequestRouter


class LeastLoadedRouter(*_router_bases()):  # type: ignore[misc]
    """Serve request router for expert shards: each call to the replica with the fewest calls in
    flight from this handle; among those, the one chosen longest ago.

    In flight = sent and not completed (`on_send_request` / `on_request_completed`) plus chosen
    and not yet sent: Serve sends a call a moment after choosing its replica, so without counting
    choices two chunks routed together would both see an idle replica. `choose_replicas` has no
    await, so concurrent routing tasks see each other's choices. Serve reports completions a little
    after the caller has its result, so the next step's chunks often find the replicas equally
    (and stale) busy: the least recently chosen one then wins, which deals a step's chunks out one
    per replica. Measured, 400 steps of two concurrent chunks on 2 replicas: Serve's default router
    put both on one replica in ~50% of steps, in-flight counts alone ~25%, with this tie-break 0%
    in 6 runs of 7 (70 of 400 in one, when late completion reports made one replica look busier).

    Serve's requests from one dispatcher step share an internal request id (they inherit the
    engine loop's request context), so nothing here is keyed by it, and pending calls are matched
    to replicas first-in first-out (`FIFOMixin`), as Serve's default router does.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self._sent: dict[Any, int] = {}  # replica id -> calls sent, not completed
        self._chosen: dict[Any, deque[float]] = {}  # replica id -> times of choices not yet sent
        self._last_chosen: dict[Any, float] = {}  # replica id -> when it was last chosen

    async def choose_replicas(self, candidate_replicas: list[Any],
                              pending_request: Any | None = None) -> list[list[Any]]:
        if not candidate_replicas:
            return []
        ranked = sorted(candidate_replicas, key=self._load_key)
        now = time.monotonic()
        self._chosen.setdefault(ranked[0].replica_id, deque()).append(now)
        self._last_chosen[ranked[0].replica_id] = now
        if pending_request is not None:
            # Every replica is ranked at once: when none can take the call, Serve must back off
            # before asking again (without it, its routing loop spins and starves the event loop).
            pending_request.routing_context.should_backoff = True
        return [[r] for r in ranked]

    def on_send_request(self, replica_id: Any) -> None:
        super().on_send_request(replica_id)
        self._sent[replica_id] = self._sent.get(replica_id, 0) + 1
        chosen = self._chosen.get(replica_id)
        if chosen:
            chosen.popleft()

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self._sent[replica_id] = max(0, self._sent.get(replica_id, 0) - 1)

    def in_flight(self, replica_id: Any) -> int:
        """Calls to `replica_id` sent and not completed, or chosen (in the last `CHOICE_TTL_S`), not sent."""
        chosen = self._chosen.get(replica_id)
        now = time.monotonic()
        while chosen and now - chosen[0] > CHOICE_TTL_S:
            chosen.popleft()
        return self._sent.get(replica_id, 0) + len(chosen or ())

    def _load_key(self, replica: Any) -> tuple[int, float, float]:
        rid = replica.replica_id
        return self.in_flight(rid), self._last_chosen.get(rid, 0.0), random.random()


def shard_router_config() -> Any:
    """`request_router_config` for the expert-shard deployments: `LeastLoadedRouter`, replica load
    reports every 2 s."""
    from ray.serve.config import RequestRouterConfig

    options: dict[str, Any] = {"request_router_class": f"{__name__}:LeastLoadedRouter",
                               "request_routing_stats_period_s": 2.0, "request_routing_stats_timeout_s": 5.0}
    return RequestRouterConfig(**options)
