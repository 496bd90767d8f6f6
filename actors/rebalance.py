"""Online expert re-placement, the coordinator: plan from observed load, then drive a move on the board.

`plan_move` runs the EPLB-style planner (`plan_placement`) on per-(layer, expert) token counts and
renumbers each layer's planned shards to keep as many experts where they are as it can (`align`), so a
move loads only what must move. `rebalance` applies a plan only if it raises the balancedness by at
least `margin`, and drives the board (`actors/board.py`) through prepare -> commit -> done:

- prepare: wait until every live shard replica holds old ∪ target; any load error, a participant
  going silent (died) or the timeout abandons the move whole (phase abort: the old placement stays,
  replicas drop what they loaded);
- commit: wait until every live dispatcher routes with the target (dead ones are not waited for; a
  replacement reads the board when it starts). Past commit a move only rolls forward: if a live
  dispatcher does not switch in time the board stays in commit (consistent: shards hold both) and
  the next `rebalance` finishes it;
- done: the target is in force; wait (briefly) for shard replicas to free the experts they lost.

Balancedness = mean ÷ max tokens per shard: per layer, and overall Σ_l mean_l ÷ Σ_l max_l (a step
waits for each layer's busiest shard, so this is the fraction of the experts' time that is useful).

Letters: L layers, E experts, G shards.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from moray.actors.board import STALE_S, BoardState, Move, PlacementBoard, Report
from moray.actors.placement import Placement, gpu_loads, plan_placement

log = logging.getLogger(__name__)

POLL_S = 0.1
Outcome = Literal["applied", "skipped", "dry-run", "aborted", "stalled", "busy", "failed", "not-due"]
CAUSES = ("margin", "load-error", "replica-died", "timeout", "dispatcher-timeout", "busy", "no-placement")
Failure = tuple[str, str]  # (cause, what happened)


@dataclass(frozen=True)
class Timeouts:
    prepare_s: float = 120.0  # for every shard replica to load what it gains
    commit_s: float = 30.0  # for every dispatcher to switch
    release_s: float = 10.0  # for shard replicas to free what they lost (not waited for beyond this)


def balancedness(per_shard: np.ndarray) -> tuple[np.ndarray, float]:
    """per_shard [L, G] tokens -> (per layer mean/max [L] (1.0 for an idle layer), overall Σmean/Σmax)."""
    per_shard = np.asarray(per_shard, dtype=np.float64)
    mean, top = per_shard.mean(axis=1), per_shard.max(axis=1)  # [L], [L]
    layers = np.divide(mean, top, out=np.ones_like(mean), where=top > 0)
    overall = float(mean.sum() / top.sum()) if top.sum() > 0 else 1.0
    return layers, overall


# ---- planning ------------------------------------------------------------------------------------
def align(current: Placement, target: Placement) -> Placement:
    """`target` with each layer's shards renumbered to keep the most experts where `current` has them
    (greedy matching of planned shard -> shard by overlap, then pairwise swaps while the overlap grows)."""
    layers = []
    for layer in range(target.num_layers):
        have = [set(shard[layer]) for shard in current.slots]  # [G]
        want = [set(shard[layer]) for shard in target.slots]  # [G]
        overlap = np.array([[len(w & h) for h in have] for w in want])  # [G planned, G current]
        layers.append([want[i] for i in _match(overlap)])
    return Placement(slots=tuple(tuple(tuple(sorted(layers[lay][g])) for lay in range(target.num_layers))
                                 for g in range(target.num_shards)))


def _match(overlap: np.ndarray) -> list[int]:
    """order[g] = the planned shard that becomes shard g, maximizing the total overlap (near-optimal)."""
    n = overlap.shape[0]
    order = [-1] * n
    free_planned, free_shards = set(range(n)), set(range(n))
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        p, g = divmod(int(flat), n)
        if p in free_planned and g in free_shards:
            order[g] = p
            free_planned.discard(p)
            free_shards.discard(g)
    improved = True
    while improved:
        improved = False
        for a in range(n):
            for b in range(a + 1, n):
                swapped = overlap[order[b], a] + overlap[order[a], b]
                gain = swapped - overlap[order[a], a] - overlap[order[b], b]
                if gain > 0:
                    order[a], order[b] = order[b], order[a]
                    improved = True
    return order


Moved = tuple[int, int, tuple[int, ...], tuple[int, ...]]  # (layer, expert, shards before, shards after)


def moves_between(current: Placement, target: Placement) -> list[Moved]:
    """(layer, expert, shards before, shards after) for every (layer, expert) whose owners change."""
    out = []
    for layer in range(target.num_layers):
        for e in range(max(current.num_experts, target.num_experts)):
            before, after = tuple(current.owners(layer, e)), tuple(target.owners(layer, e))
            if before != after:
                out.append((layer, e, before, after))
    return out


@dataclass(frozen=True)
class MovePlan:
    current: Placement
    target: Placement
    loads: np.ndarray  # [L, E] tokens over the window
    before: np.ndarray  # [L] balancedness with `current`
    after: np.ndarray  # [L] balancedness with `target` (predicted: each expert's tokens split evenly)
    before_overall: float
    after_overall: float
    moved: list[Moved]

    def gain(self) -> float:
        return self.after_overall - self.before_overall

    def describe(self) -> str:
        pairs = ", ".join(f"L{lay}E{e} {list(a)}->{list(b)}" for lay, e, a, b in self.moved[:12])
        more = f" (+{len(self.moved) - 12} more)" if len(self.moved) > 12 else ""
        return (f"balancedness {self.before_overall:.3f} -> {self.after_overall:.3f} (worst layer "
                f"{self.before.min():.3f} -> {self.after.min():.3f}), {len(self.moved)} (layer, expert) "
                f"pairs change shards: {pairs or 'none'}{more}")


def plan_move(current: Placement, loads: np.ndarray, redundant: int,
              slots_per_gpu: int | None = None) -> MovePlan:
    loads = np.asarray(loads, dtype=np.float64)  # [L, E]
    target = align(current, plan_placement(loads, current.num_shards, redundant, slots_per_gpu))
    before, before_all = balancedness(gpu_loads(current, loads))
    after, after_all = balancedness(gpu_loads(target, loads))
    moved = moves_between(current, target)
    return MovePlan(current, target, loads, before, after, before_all, after_all, moved)


# ---- driving a move ------------------------------------------------------------------------------
@dataclass
class MoveResult:
    outcome: Outcome
    reason: str
    version: int  # the placement version in force afterwards
    plan: MovePlan | None = None
    cause: str = ""  # why a move was not made, in a word (a metric label): see CAUSES
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds spent in prepare / commit / release

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"outcome": self.outcome, "cause": self.cause, "reason": self.reason,
                                "version": self.version, "seconds": round(self.seconds, 3),
                                "phases": self.phases}
        if self.plan is not None:
            p = self.plan
            body.update(balancedness_before=p.before_overall, balancedness_after=p.after_overall,
                        layers_before=p.before.tolist(), layers_after=p.after.tolist(),
                        moved=[[lay, e, list(a), list(b)] for lay, e, a, b in p.moved],
                        target=[[list(ids) for ids in shard] for shard in p.target.slots])
        return body


def rebalance(board: PlacementBoard, loads: np.ndarray, *, redundant: int, margin: float = 0.05,
              dry_run: bool = False, slots_per_gpu: int | None = None, timeouts: Timeouts = Timeouts(),
              due_s: float | None = None) -> MoveResult:
    """Plan from `loads` [L, E] and, unless `dry_run` or the gain is below `margin`, move to the plan.
    `due_s`: do nothing ("not-due") if any coordinator started a rebalance on this board less than
    `due_s` ago (periodic rebalancing from several replicas)."""
    owner, t0 = uuid.uuid4().hex[:12], time.monotonic()
    if not board.try_lock(owner):
        why = "another coordinator is moving experts on this board"
        return _log(MoveResult("busy", why, -1, cause="busy"))
    try:
        state = board.read()
        if state is None:
            why = "the placement board holds no placement"
            return _log(MoveResult("failed", why, -1, cause="no-placement"))
        if due_s is not None and not dry_run:
            if time.time() - board.last_attempt() < due_s:
                return MoveResult("not-due", f"a rebalance started less than {due_s:g} s ago", state.version)
            board.mark_attempt()
        if state.active is not None:
            stuck = _recover(board, state, owner, timeouts)
            if stuck is not None:
                return stuck
            state = board.read() or state
        plan = plan_move(state.placement, loads, redundant, slots_per_gpu)
        if dry_run:
            return _log(MoveResult("dry-run", plan.describe(), state.version, plan))
        if plan.gain() < margin or not plan.moved:
            why = f"gain {plan.gain():+.3f} below the margin {margin:.3f}: {plan.describe()}"
            return _log(MoveResult("skipped", why, state.version, plan, cause="margin"))
        result = _apply(board, state, plan, owner, timeouts)
        result.seconds = time.monotonic() - t0
        return _log(result)
    finally:
        board.unlock(owner)


def _apply(board: PlacementBoard, state: BoardState, plan: MovePlan, owner: str,
           timeouts: Timeouts) -> MoveResult:
    _forget_dead(board)
    version = state.next_version()
    move = Move(version, plan.target, "prepare", moved=tuple(plan.moved))
    moving = BoardState(state.version, state.placement, move)
    participants = {r.name for r in _shards(board) if r.live}
    t = time.monotonic()
    board.write(moving)
    failure = _wait_shards(board, f"{state.version}+{version}", participants, owner, timeouts.prepare_s,
                           plan.current.num_shards)
    phases = {"prepare": time.monotonic() - t}
    if failure is not None:
        cause, what = failure
        board.write(moving.with_phase("abort", what))
        _wait_shards(board, str(state.version), set(), owner, timeouts.release_s, plan.current.num_shards)
        why = f"move to v{version} abandoned, v{state.version} stays in force: {what}"
        return MoveResult("aborted", why, state.version, plan, cause, phases=phases)
    return _commit(board, moving.with_phase("commit"), owner, timeouts, plan, phases)


def _commit(board: PlacementBoard, committed: BoardState, owner: str, timeouts: Timeouts,
            plan: MovePlan | None, phases: dict[str, float]) -> MoveResult:
    move = committed.move
    assert move is not None
    t = time.monotonic()
    board.write(committed)
    late = _wait_dispatchers(board, move.version, owner, timeouts.commit_s)
    phases["commit"] = time.monotonic() - t
    if late:
        why = (f"move to v{move.version} committed but dispatchers {late} have not switched within "
               f"{timeouts.commit_s:g} s; shards keep both placements until a later rebalance finishes it")
        return MoveResult("stalled", why, committed.version, plan, "dispatcher-timeout", phases=phases)
    t = time.monotonic()
    board.write(committed.with_phase("done"))
    slow = _wait_shards(board, str(move.version), set(), owner, timeouts.release_s, move.target.num_shards)
    phases["release"] = time.monotonic() - t
    if slow:
        log.warning("placement v%d in force, but not every shard replica has freed its old experts yet: %s",
                    move.version, slow[1])
    why = plan.describe() if plan is not None else "finished a move left in commit"
    return MoveResult("applied", why, move.version, plan, phases=phases)


def _recover(board: PlacementBoard, state: BoardState, owner: str, timeouts: Timeouts) -> MoveResult | None:
    """A move left under way by a coordinator that died: abandon it before commit, finish it after."""
    move = state.active
    assert move is not None
    if move.phase == "prepare":
        reason = f"its coordinator stopped during prepare (move to v{move.version})"
        log.warning("placement board %s: abandoning a move: %s", board.group, reason)
        board.write(state.with_phase("abort", reason))
        return None
    log.warning("placement board %s: finishing the committed move to v%d", board.group, move.version)
    result = _commit(board, state, owner, timeouts, None, {})
    return None if result.outcome == "applied" else _log(result)


def _shards(board: PlacementBoard) -> list[Report]:
    return [r for r in board.reports() if r.kind == "shard"]


def _forget_dead(board: PlacementBoard) -> None:
    """Drop heartbeats of processes long gone (killed without retracting)."""
    board.forget([r for r in board.reports() if time.time() - r.t > 10 * STALE_S])


def _wait_shards(board: PlacementBoard, tag: str, participants: set[str], owner: str, timeout_s: float,
                 num_shards: int) -> Failure | None:
    """Wait until every live shard replica holds `tag` and every shard has one; None, or why not."""
    deadline = time.monotonic() + timeout_s
    while True:
        board.renew(owner)
        reports = _shards(board)
        problem = _shard_problem(reports, tag, participants)
        if problem is not None:
            return problem
        live = [r for r in reports if r.live]
        behind = [f"{r.shard}/{r.name}" for r in live if r.body.get("holds") != tag]
        empty = sorted(set(range(num_shards)) - {r.shard for r in live})
        if not behind and not empty:
            return None
        if time.monotonic() > deadline:
            missing = f"shards {empty} have no live replica" if empty else f"replicas {behind} still loading"
            return "timeout", f"timed out after {timeout_s:g} s waiting for placement {tag}: {missing}"
        time.sleep(POLL_S)


def _shard_problem(reports: list[Report], tag: str, participants: set[str]) -> Failure | None:
    by_name = {r.name: r for r in reports}
    for r in reports:
        error = r.body.get("error") or {}
        if r.live and error.get("tag") == tag:
            what = f"shard {r.shard} replica {r.name} could not load its experts: {error.get('message')}"
            return "load-error", what
    for name in sorted(participants):
        r = by_name.get(name)
        if r is None:  # retracted: stopped on purpose (Serve scaled it down), not a failure
            participants.discard(name)
        elif not r.live:
            return "replica-died", f"shard {r.shard} replica {name} stopped reporting during the move (died?)"
    return None


def _wait_dispatchers(board: PlacementBoard, version: int, owner: str, timeout_s: float) -> list[str]:
    """Wait until every live dispatcher routes with `version`; the ones that have not (empty: all did)."""
    deadline = time.monotonic() + timeout_s
    while True:
        board.renew(owner)
        late = [r.name for r in board.reports() if r.kind == "dispatcher" and r.live
                and r.body.get("version") != version]
        if not late or time.monotonic() > deadline:
            return late
        time.sleep(POLL_S)


def _log(result: MoveResult) -> MoveResult:
    level = {"applied": logging.INFO, "skipped": logging.INFO, "dry-run": logging.INFO}.get(result.outcome,
                                                                                           logging.ERROR)
    log.log(level, "rebalance %s (placement v%d in force, %.1f s): %s", result.outcome, result.version,
            result.seconds, result.reason)
    return result
