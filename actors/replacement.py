"""Online expert re-placement, the followers' side: shard replicas and dispatchers track the placement board.

`ShardFollower` (in every `ExpertShard` given a board) and `DispatcherFollower` (in every `Dispatcher`)
each run a thread that reads the board's record every `HEARTBEAT_S` and reports under their own key.
The coordinator (`actors/rebalance.py`) moves the record through a move's phases:

    prepare  shard replicas load the experts they gain (only those, from the checkpoint, on the follower's
             loader thread while the replica keeps serving) and report holding old ∪ target ("3+4");
    commit   dispatchers stage the target and switch to it when no expert call is in flight, then report
             the version they route with; shard replicas still hold old ∪ target, so a step routed
             either way is served;
    done     the target is in force: shard replicas let go of the experts they lost ("4");
    abort    shard replicas drop what they loaded ("3"); dispatchers never routed with the target.

Peak extra memory on a shard: the experts it gains. A replica or dispatcher that starts during a move
registers first and then reads the board, so a coordinator either waits for it or it already sees the
phase it must follow (`board.shard_holding`, `board.routing_placement`).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from moray.actors.board import HEARTBEAT_S, PlacementBoard, routing_placement, shard_holding

if TYPE_CHECKING:
    from moray.actors.placement import Placement
    from moray.actors.sharded import ShardedExperts

log = logging.getLogger(__name__)


class Holder(Protocol):
    """What a shard follower needs of its replica (`ExpertShard`, which imports this module)."""

    shard_id: int
    replica: str

    @property
    def holding(self) -> Any: ...  # `experts.Holding`: .tag, .experts, .banks

    def hold(self, experts: Mapping[int, Sequence[int]], tag: str = "") -> None: ...


class _Follower:
    """A daemon thread calling `tick()` every `HEARTBEAT_S` until `stop()`."""

    name = "follower"

    def __init__(self, board: PlacementBoard) -> None:
        self.board = board
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - the GCS restarting: try again next beat
                log.warning("%s: placement board unreachable: %s", self.name, e)
            self._stop.wait(HEARTBEAT_S)

    def tick(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()
        try:
            self.retract()
        except Exception as e:  # noqa: BLE001 - the cluster is going away too
            log.debug("%s: could not retract the heartbeat: %s", self.name, e)

    def retract(self) -> None:
        raise NotImplementedError


class ShardFollower(_Follower):
    def __init__(self, board: PlacementBoard, shard: Holder) -> None:
        super().__init__(board)
        self.shard = shard
        self.name = f"shard-{shard.shard_id}-{shard.replica}-board"
        self.active = False  # reconcile only once the replica has loaded its first experts
        self.loading: str | None = None  # the tag being loaded
        self.failed: set[str] = set()  # tags whose load failed: not retried (the coordinator aborts)
        self.error: dict[str, str] | None = None

    def begin(self, fallback: Mapping[int, Sequence[int]]) -> tuple[str, Mapping[int, Sequence[int]]]:
        """Register (from now on a coordinator waits for this replica), then read what to hold first."""
        self.report()
        self._start_thread()
        state = self.board.read()
        if state is None:
            return "", fallback
        return shard_holding(state, self.shard.shard_id)

    def start(self) -> None:
        self.active = True

    def tick(self) -> None:
        state = self.board.read() if self.active else None
        if state is not None:
            tag, wanted = shard_holding(state, self.shard.shard_id)
            if tag != self.shard.holding.tag and tag not in self.failed and self.loading is None:
                self.loading = tag
                threading.Thread(target=self._hold, args=(tag, wanted), name=f"{self.name}-load",
                                 daemon=True).start()
        self.report()

    def _hold(self, tag: str, wanted: Mapping[int, Sequence[int]]) -> None:
        try:
            self.shard.hold(wanted, tag)
        except Exception as e:  # noqa: BLE001 - any load failure abandons the move, it must be reported
            self.failed.add(tag)
            self.error = {"tag": tag, "message": f"{type(e).__name__}: {e}"}
            log.error("expert shard %d replica %s cannot hold placement %s, keeps %s: %s",
                      self.shard.shard_id, self.shard.replica, tag, self.shard.holding.tag,
                      self.error["message"])
        finally:
            self.loading = None
        self.report()

    def report(self) -> None:
        if self._stop.is_set():  # left the board: a load finishing late must not announce it again
            return
        holding = self.shard.holding
        body: dict[str, Any] = {"holds": holding.tag, "loading": self.loading, "error": self.error,
                                "pairs": sum(map(len, holding.experts.values())),
                                "param_bytes": sum(b.param_bytes() for b in holding.banks.values())}
        self.board.report_shard(self.shard.shard_id, self.shard.replica, body)

    def retract(self) -> None:
        self.board.retract_shard(self.shard.shard_id, self.shard.replica)


class DispatcherFollower(_Follower):
    """Keeps a dispatcher's `ShardedExperts` on the board's routing placement (`routing_placement`)."""

    def __init__(self, board: PlacementBoard) -> None:
        super().__init__(board)
        self.id = uuid.uuid4().hex[:12]
        self.name = f"dispatcher-{self.id}-board"
        self.experts: ShardedExperts | None = None

    def begin(self, fallback: Placement) -> tuple[int, Placement]:
        """Register, then read the placement to start with, (version, placement); on an empty board, put
        `fallback` in force as version 1 first (the first dispatcher of a deployment does)."""
        self.board.report_dispatcher(self.id, {"version": None})
        state = self.board.read() or self.board.initialize(fallback)
        version, placement = routing_placement(state)
        self.board.report_dispatcher(self.id, {"version": version})
        return version, placement

    def follow(self, experts: ShardedExperts) -> None:
        self.experts = experts
        self._start_thread()

    def tick(self) -> None:
        assert self.experts is not None
        state = self.board.read()
        if state is not None:
            version, placement = routing_placement(state)
            if version != self.experts.version:
                self.experts.stage(version, placement)
        if self._stop.is_set():
            return
        self.board.report_dispatcher(self.id, {"version": self.experts.version,
                                               "staged": self.experts.staged_version})

    def retract(self) -> None:
        self.board.retract_dispatcher(self.id)
