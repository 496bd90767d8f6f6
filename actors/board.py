"""The placement board: which placement is in force and what a move is doing, in Ray's GCS key-value store.

Every process of a deployment reads one record and reports under its own key; only a coordinator
(`actors/rebalance.py`, holding the board's lock) writes the record. Keys under
`moray/placement/<group>/` (namespace "moray", like the data-plane `Directory`):

- `state`: `{"version", "placement", "move"}`: the placement in force and its version, and the move
  under way or last made: `{"version", "target", "phase", "reason"}`. One key, so a reader never sees
  the placement of one version with the move of another.
- `shards/<shard>/<replica>`: a shard replica's heartbeat: what it holds (`holds`, see `shard_tag`) and
  the last load error (`error`).
- `dispatchers/<id>`: a dispatcher's heartbeat: the placement version it routes with (`version`).
- `lock`: the coordinator's lease (`owner`, `t`); `last`: when a rebalance last started (`t`).

A move's phases: `prepare` (shards load the experts they gain and hold old ∪ target), `commit`
(dispatchers switch to the target between steps), `done` (the target is in force; shards free what
they lost), or `abort` (shards drop what they loaded; the old placement stays). Heartbeats carry a
wall-clock time (`time.time()`): a key older than `STALE_S` is a process that died (nodes' clocks
are NTP-synced on any real cluster; the heartbeat period is 10x shorter).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from moray.actors.placement import Placement

log = logging.getLogger(__name__)

NAMESPACE = "moray"
PREFIX = "moray/placement/"
HEARTBEAT_S = 0.5  # how often shard replicas and dispatchers read the board and report
STALE_S = 5.0  # a heartbeat this old is a process that died
LOCK_TTL_S = 30.0  # a coordinator lease not renewed for this long may be taken over

Phase = Literal["prepare", "commit", "done", "abort"]
ACTIVE: tuple[Phase, ...] = ("prepare", "commit")


@dataclass(frozen=True)
class Move:
    version: int  # the version the target gets once in force
    target: Placement
    phase: Phase
    reason: str = ""  # why it was abandoned (phase "abort")
    moved: tuple[tuple[int, int, tuple[int, ...], tuple[int, ...]], ...] = ()  # (layer, expert, from, to)


@dataclass(frozen=True)
class BoardState:
    version: int
    placement: Placement
    move: Move | None = None

    @property
    def active(self) -> Move | None:
        """The move under way (prepare or commit), if any."""
        return self.move if self.move is not None and self.move.phase in ACTIVE else None

    def next_version(self) -> int:
        return 1 + max(self.version, self.move.version if self.move else 0)

    def with_phase(self, phase: Phase, reason: str = "") -> BoardState:
        assert self.move is not None
        move = replace(self.move, phase=phase, reason=reason)
        if phase == "done":
            return BoardState(move.version, move.target, move)
        return replace(self, move=move)

    def to_json(self) -> str:
        move = None
        if self.move is not None:
            m = self.move
            move = {"version": m.version, "target": json.loads(m.target.to_json()), "phase": m.phase,
                    "reason": m.reason, "moved": [[lay, e, list(a), list(b)] for lay, e, a, b in m.moved]}
        return json.dumps({"version": self.version, "placement": json.loads(self.placement.to_json()),
                           "move": move})

    @classmethod
    def from_json(cls, text: str | bytes) -> BoardState:
        body = json.loads(text)
        raw = body.get("move")
        move = None
        if raw:
            moved = tuple((int(a), int(b), tuple(c), tuple(d)) for a, b, c, d in raw.get("moved", []))
            move = Move(int(raw["version"]), Placement.from_json(json.dumps(raw["target"])), raw["phase"],
                        raw.get("reason", ""), moved)
        return cls(int(body["version"]), Placement.from_json(json.dumps(body["placement"])), move)


def routing_placement(state: BoardState) -> tuple[int, Placement]:
    """(version, placement) a dispatcher routes with: the target once a move commits, else the one in
    force."""
    move = state.active
    if move is not None and move.phase == "commit":
        return move.version, move.target
    return state.version, state.placement


def shard_holding(state: BoardState, shard: int) -> tuple[str, dict[int, list[int]]]:
    """(tag, layer -> expert ids) shard `shard` must hold: the placement in force, or during a move the
    union of it and the target (so both old and new routes are served). Tags: "3" or "3+4"."""
    held = state.placement.shard_experts(shard)
    move = state.active
    if move is None:
        return str(state.version), held
    gained = move.target.shard_experts(shard)
    union = {lay: sorted(set(held.get(lay, [])) | set(ids)) for lay, ids in gained.items()}
    return f"{state.version}+{move.version}", {**held, **union}


@dataclass(frozen=True)
class Report:
    """One heartbeat read back: who, when, and what it said."""

    kind: Literal["shard", "dispatcher"]
    shard: int  # -1 for a dispatcher
    name: str  # replica id / dispatcher id
    t: float
    body: dict[str, Any]

    @property
    def live(self) -> bool:
        return time.time() - self.t < STALE_S


class PlacementBoard:
    def __init__(self, group: str) -> None:
        if "/" in group:
            raise ValueError(f"placement group names cannot contain '/': {group!r}")
        self.group = group
        self.prefix = f"{PREFIX}{group}/"

    # ---- the record ----------------------------------------------------------------------------
    def read(self) -> BoardState | None:
        raw = _get(self.prefix + "state")
        return BoardState.from_json(raw) if raw else None

    def write(self, state: BoardState) -> None:
        _put(self.prefix + "state", state.to_json())

    def initialize(self, placement: Placement) -> BoardState:
        """Put version 1 of `placement` in force unless the board already has a state; return the state."""
        _put(self.prefix + "state", BoardState(1, placement).to_json(), overwrite=False)
        state = self.read()
        assert state is not None
        return state

    # ---- heartbeats ----------------------------------------------------------------------------
    def report_shard(self, shard: int, replica: str, body: Mapping[str, Any]) -> None:
        _put(f"{self.prefix}shards/{shard}/{replica}", json.dumps({**body, "t": time.time()}))

    def report_dispatcher(self, name: str, body: Mapping[str, Any]) -> None:
        _put(f"{self.prefix}dispatchers/{name}", json.dumps({**body, "t": time.time()}))

    def retract_shard(self, shard: int, replica: str) -> None:
        _delete(f"{self.prefix}shards/{shard}/{replica}")

    def retract_dispatcher(self, name: str) -> None:
        _delete(f"{self.prefix}dispatchers/{name}")

    def reports(self) -> list[Report]:
        """Every heartbeat on the board, live or not (a few GCS calls)."""
        found = []
        for key, body in _items(self.prefix + "shards/"):
            shard, name = key.split("/")[-2:]
            found.append(Report("shard", int(shard), name, float(body.get("t", 0.0)), body))
        for key, body in _items(self.prefix + "dispatchers/"):
            found.append(Report("dispatcher", -1, key.split("/")[-1], float(body.get("t", 0.0)), body))
        return found

    def forget(self, reports: Sequence[Report]) -> None:
        for r in reports:
            (self.retract_shard(r.shard, r.name) if r.kind == "shard" else self.retract_dispatcher(r.name))

    # ---- the coordinator's lease ---------------------------------------------------------------
    def try_lock(self, owner: str) -> bool:
        """Take the lease if free, held by `owner`, or not renewed for `LOCK_TTL_S`."""
        key = self.prefix + "lock"
        if not _put(key, json.dumps({"owner": owner, "t": time.time()}), overwrite=False):
            return True
        raw = _get(key)
        held = json.loads(raw) if raw else {}
        if held.get("owner") == owner or time.time() - float(held.get("t", 0.0)) > LOCK_TTL_S:
            self.renew(owner)
            return True
        return False

    def renew(self, owner: str) -> None:
        _put(self.prefix + "lock", json.dumps({"owner": owner, "t": time.time()}))

    def unlock(self, owner: str) -> None:
        raw = _get(self.prefix + "lock")
        if raw and json.loads(raw).get("owner") == owner:
            _delete(self.prefix + "lock")

    def last_attempt(self) -> float:
        """When a coordinator last started a rebalance on this board (wall clock; 0.0: never)."""
        raw = _get(self.prefix + "last")
        return float(json.loads(raw)["t"]) if raw else 0.0

    def mark_attempt(self) -> None:
        _put(self.prefix + "last", json.dumps({"t": time.time()}))

    def clear(self) -> None:
        from ray.experimental import internal_kv

        if internal_kv._internal_kv_initialized():
            internal_kv._internal_kv_del(self.prefix.encode(), del_by_prefix=True, namespace=NAMESPACE)


# ---- the GCS key-value store ---------------------------------------------------------------------
def _put(key: str, value: str, overwrite: bool = True) -> bool:
    """True when the key already existed (and, with overwrite=False, was left as it was)."""
    from ray.experimental import internal_kv

    return bool(internal_kv._internal_kv_put(key.encode(), value.encode(), overwrite=overwrite,
                                             namespace=NAMESPACE))


def _get(key: str) -> bytes | None:
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(key.encode(), namespace=NAMESPACE)
    return value if value else None


def _delete(key: str) -> None:
    from ray.experimental import internal_kv

    if internal_kv._internal_kv_initialized():
        internal_kv._internal_kv_del(key.encode(), namespace=NAMESPACE)


def _items(prefix: str) -> list[tuple[str, dict[str, Any]]]:
    from ray.experimental import internal_kv

    found = []
    for key in internal_kv._internal_kv_list(prefix.encode(), namespace=NAMESPACE):
        value = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
        if value:
            try:
                found.append((key.decode(), json.loads(value)))
            except ValueError:
                log.warning("ignoring a malformed placement-board entry under %r", key)
    return found
