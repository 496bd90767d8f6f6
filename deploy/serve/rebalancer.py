"""Online expert re-placement in the Serve app: load from the shard replicas' windows, balancedness, and
the rebalancer every dispatcher replica carries (`moray rebalance` calls it; `--rebalance-interval` runs it
periodically).

The coordinator itself is `actors/rebalance.py`; this module feeds it the app's load and records the
outcome. Loads are the shard replicas' token windows (`load_report()["rates"]`, tokens/s per (layer,
expert) over the last ~10 s, summed over replicas), or their cumulative counts when nothing ran lately.
Several dispatcher replicas may run the periodic loop: the board's lock and its `due` record let one
of them move per interval.

Letters: L layers, E experts, G shards.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from moray.actors.board import PlacementBoard
from moray.actors.rebalance import MoveResult, balancedness, rebalance
from moray.deploy.serve import metrics, state

log = logging.getLogger(__name__)

BALANCE_S = 10.0  # how often a dispatcher replica exports the balancedness gauges


@dataclass(frozen=True)
class RebalancePolicy:
    """How the app re-places experts online (`ServerConfig.rebalance_*`, `redundant_experts`)."""

    interval_s: float | None = None  # None: only when asked (`moray rebalance`)
    redundant: int = 0  # extra expert copies per layer the planner may add
    margin: float = 0.05  # least balancedness gain that justifies a move


def load_tables(reports: Iterable[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(per shard [L, G], per expert [L, E], "tokens_per_s" or "tokens") from shard load reports: the
    window's rates, or the cumulative counts when every rate is zero. None without reports."""
    reports = list(reports)
    if not reports:
        return None
    num_layers, num_experts = int(reports[0]["num_layers"]), int(reports[0]["num_experts"])
    num_shards = 1 + max(int(r["shard"]) for r in reports)
    for key, unit in (("rates", "tokens_per_s"), ("tokens", "tokens")):
        shards, experts = np.zeros((num_layers, num_shards)), np.zeros((num_layers, num_experts))
        for r in reports:
            for layer, expert, n in r[key]:
                shards[int(layer), int(r["shard"])] += n
                experts[int(layer), int(expert)] += n
        if experts.any():
            return shards, experts, unit
    return shards, experts, "tokens"


def balance_report(reports: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """{"overall", "layers" [L], "by", "placement": tags the replicas hold} (mean ÷ max tokens per shard)."""
    reports = list(reports)
    tables = load_tables(reports)
    if tables is None:
        return None
    per_shard, _, unit = tables
    layers, overall = balancedness(per_shard)
    tags = sorted({str(r.get("placement", "")) for r in reports})
    return {"overall": overall, "layers": layers.tolist(), "by": unit, "placement": tags}


def shard_reports(app: str) -> list[dict[str, Any]]:
    """Every expert-shard replica's load report (blocking: Serve's controller and each replica)."""
    status = state.app_status(app)
    return [r for s in status["shards"].values() for r in s["replicas"]]


class AppRebalancer:
    """What a dispatcher replica runs: `once()` on demand, `start()` for the periodic loop."""

    def __init__(self, board: PlacementBoard, policy: RebalancePolicy) -> None:
        self.board, self.policy = board, policy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def once(self, *, dry_run: bool = False, redundant: int | None = None, margin: float | None = None,
             due_s: float | None = None) -> MoveResult:
        reports = shard_reports(_app_name())
        tables = load_tables(reports)
        if tables is None:
            return MoveResult("failed", "no expert-shard replica reported its load", -1, cause="no-load")
        per_shard, per_expert, unit = tables
        self._export(per_shard)
        result = rebalance(self.board, per_expert, redundant=self.policy.redundant if redundant is None
                           else redundant, margin=self.policy.margin if margin is None else margin,
                           dry_run=dry_run, due_s=due_s)
        if result.outcome != "not-due":
            metrics.record_rebalance(result.outcome, result.cause, result.version)
        log.debug("rebalance planned from %s", unit)
        return result

    def measure(self) -> dict[str, Any] | None:
        """Export the balancedness gauges from the replicas' reports now; the report, or None."""
        reports = shard_reports(_app_name())
        tables = load_tables(reports)
        if tables is not None:
            self._export(tables[0])
        state = self.board.read()
        if state is not None:
            metrics.set_placement_version(state.version)
        return balance_report(reports)

    def _export(self, per_shard: np.ndarray) -> None:
        layers, overall = balancedness(per_shard)
        metrics.set_balancedness(layers.tolist(), overall)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rebalancer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        interval = self.policy.interval_s
        while not self._stop.wait(min(BALANCE_S, interval or BALANCE_S)):
            try:
                if interval:
                    self.once(due_s=interval)
                else:
                    self.measure()
            except Exception as e:  # noqa: BLE001 - Serve's controller busy, a replica restarting
                log.warning("periodic rebalance failed: %s", e)


def _app_name() -> str:
    from ray import serve

    return str(serve.get_replica_context().app_name)
