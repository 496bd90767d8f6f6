"""The dispatcher's table of data-plane channels, one per live shard replica, kept in step with the
directory (`actors/dataplane/directory.py`) by a discovery task on the engine's event loop.

- New replicas: every `DISCOVER_S` the task lists the announced endpoints and opens a channel to each
  live one (its heartbeat moves) it has none to, all at once, each within `CONNECT_TIMEOUT_S`: shared
  memory on the same node unless `transport="socket"`, TCP across nodes. A new channel must answer a
  probe (a one-row call) before it is used. New channels join the table only between steps
  (`between_steps`), so a step's rows never move mid-layer, except for a shard that has no usable
  channel at all: its callers are waiting.
- Faults (`actors/faults.py`): a channel whose replica died, hung or refused a frame is failed by the
  call that met it, left out of every later call and closed between steps; the replica is reconnected
  (and probed) only after a back-off that doubles with each fault in a row, so a hung replica costs
  one missed deadline, not one per step. A replica whose heartbeat stopped is not dialled; its entry is
  deleted after `FORGET_S` (its owner puts it back if it was only paused).
- A draining replica (Serve is stopping it) is left out of new calls and closed between steps, which
  is what its `drain()` waits for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch

from moray.actors.dataplane.channel import Channel, ChannelSpec, Endpoint
from moray.actors.dataplane.directory import FORGET_S, STALE_S, Directory
from moray.actors.dataplane.frames import RemoteError
from moray.actors.dataplane.shm import SharedChannel
from moray.actors.dataplane.tcp import SocketChannel

log = logging.getLogger(__name__)

DISCOVER_S = 1.0  # how often the directory is read while every shard has a channel
WAIT_POLL_S = 0.05  # how often a caller with no usable channel looks again
RETRY_CONNECT_S = 0.5  # first back-off after a failed connect or a faulted channel; doubles up to:
MAX_BACKOFF_S = 8.0
PROBE_TIMEOUT_S = 5.0  # a new channel's first call (one row) must be answered within this


def open_channel(endpoint: Endpoint, spec: ChannelSpec, shared: bool) -> Channel:
    """Connect to `endpoint`: shared memory when `shared` (same node), else TCP. Blocking."""
    if shared:
        return SharedChannel.connect(endpoint, spec)
    return SocketChannel.connect(endpoint, spec)


@dataclass
class Backoff:
    """A replica that failed: when it may be dialled again, and how many failures in a row."""

    until: float
    failures: int
    why: str

Transport = Literal["auto", "socket", "ray"]


class DataPlane:
    def __init__(self, directory: Directory, spec: ChannelSpec, num_shards: int, *, node: str | None,
                 transport: Transport = "auto") -> None:
        if transport not in ("auto", "socket"):
            raise ValueError(f"a data plane carries transport 'auto' or 'socket', not {transport!r}")
        self.directory, self.spec, self.node, self.transport = directory, spec, node, transport
        self.table: list[list[Channel]] = [[] for _ in range(num_shards)]
        self.pending: list[Channel] = []
        self._failing: dict[str, Backoff] = {}  # replica -> when to dial it again
        self._noted: weakref.WeakSet[Channel] = weakref.WeakSet()  # faulted channels already backed off
        self._beats: dict[str, tuple[object, float]] = {}  # replica -> (its heartbeat, when it last moved)
        self._connecting: dict[str, asyncio.Task[None]] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="moray-connect")
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.opened = self.closed_channels = 0

    @property
    def max_rows(self) -> int:
        return self.spec.max_rows

    # ---- what ShardedExperts uses ---------------------------------------------------------------
    def links(self, shard: int) -> list[Channel]:
        return [c for c in self.table[shard] if c.usable]

    async def pick(self, shard: int, deadline: float, attempt: int) -> Channel | None:
        """The usable channel of `shard` with the fewest calls in flight; waits for one until `deadline`
        (None when it passes)."""
        self.start()
        while True:
            live = self.links(shard)
            if not live:
                self._admit(shard)
                live = self.links(shard)
            if live:
                return min(live, key=lambda c: (c.in_flight, c.calls))
            if time.perf_counter() >= deadline:
                return None
            self._wake.set()
            await asyncio.sleep(min(WAIT_POLL_S, max(deadline - time.perf_counter(), 0.0)))

    def between_steps(self) -> None:
        """Apply what discovery found: new channels in, dead and draining ones out (and closed)."""
        self.start()
        for shard in range(len(self.table)):
            self._admit(shard)
            keep = [c for c in self.table[shard] if c.usable or c.in_flight]
            for c in self.table[shard]:
                if c not in keep:
                    self._close(c)
            self.table[shard] = keep

    def _release_drained(self) -> None:
        """Close draining channels with no call in flight now, so an idle dispatcher does not hold a
        stopping replica's drain (no new call goes to a draining channel anyway)."""
        for shard, row in enumerate(self.table):
            done = [c for c in row if c.draining and not c.in_flight]
            for c in done:
                self._close(c)
            if done:
                self.table[shard] = [c for c in row if c not in done]

    def _admit(self, shard: int) -> None:
        joining = [c for c in self.pending if c.endpoint.shard == shard]
        if joining:
            self.pending = [c for c in self.pending if c.endpoint.shard != shard]
            self.table[shard] += [c for c in joining if c.usable]
            for c in joining:
                if not c.usable:
                    self._close(c)

    def _close(self, c: Channel) -> None:
        self._note_fault(c)
        c.close()
        self.closed_channels += 1
        log.info("data-plane channel to shard %d replica %s closed (%s)", c.endpoint.shard,
                 c.endpoint.replica, "drained" if c.draining else c.dead)

    def _channels(self) -> list[Channel]:
        return [*self.pending, *(c for row in self.table for c in row)]

    def _note_fault(self, c: Channel) -> None:
        """A channel ended by a fault: its replica is dialled again only after a back-off."""
        if c.fault is not None and c not in self._noted:
            self._noted.add(c)
            self._back_off(c.endpoint, f"{c.fault}: {c.dead}")

    def _back_off(self, endpoint: Endpoint, why: str) -> None:
        last = self._failing.get(endpoint.replica)
        failures = (last.failures if last else 0) + 1
        delay = min(RETRY_CONNECT_S * 2 ** (failures - 1), MAX_BACKOFF_S)
        self._failing[endpoint.replica] = Backoff(time.monotonic() + delay, failures, why)
        if failures == 1:  # the first of a streak: later ones are the same story
            log.warning("shard %d replica %s out of use (%s); dialling it again in %.1f s", endpoint.shard,
                        endpoint.replica, why, delay)

    # ---- discovery ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start discovery on the running event loop (once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._discover())

    async def _discover(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - the GCS restarting; try again next round
                log.warning("data-plane discovery failed: %s", e)
            self._release_drained()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), DISCOVER_S)
            except asyncio.TimeoutError:
                pass

    async def refresh(self) -> None:
        """Open a channel to every live announced replica that has none (each in a task of its own, so
        a replica that does not answer delays no other)."""
        found = await asyncio.to_thread(self.directory.endpoints)
        announced = [(Endpoint.from_dict(raw), raw) for raw in found]
        for c in self._channels():
            self._note_fault(c)
        known = {c.endpoint.replica for c in self._channels() if c.dead is None} | set(self._connecting)
        now, forget = time.monotonic(), list[tuple[Endpoint, object]]()
        for endpoint, raw in announced:
            if endpoint.replica in known or not 0 <= endpoint.shard < len(self.table):
                continue
            if not self._alive(endpoint, raw.get("beat"), now, forget):
                continue
            backoff = self._failing.get(endpoint.replica)
            if backoff is not None and now < backoff.until:
                continue
            task = asyncio.get_running_loop().create_task(self._connect(endpoint))
            self._connecting[endpoint.replica] = task
            task.add_done_callback(self._connected)
        for endpoint, beat in forget:
            await asyncio.to_thread(self.directory.forget, endpoint.shard, endpoint.replica, beat)

    def _connected(self, task: asyncio.Task[None]) -> None:
        for replica, t in list(self._connecting.items()):
            if t is task:
                del self._connecting[replica]

    def _alive(self, endpoint: Endpoint, beat: object, now: float, forget: list[tuple[Endpoint, object]]
               ) -> bool:
        """Whether the replica's heartbeat moved within `STALE_S`; a key still for `FORGET_S` is deleted
        (a replica killed without draining; one that was only paused puts it back with its next beat)."""
        last = self._beats.get(endpoint.replica)
        if last is None or last[0] != beat:
            self._beats[endpoint.replica] = (beat, now)
            return True
        still = now - last[1]
        if still > FORGET_S:
            log.info("forgetting shard %d replica %s: no heartbeat for %.0f s", endpoint.shard,
                     endpoint.replica, still)
            forget.append((endpoint, beat))
            self._beats.pop(endpoint.replica, None)
        return still <= STALE_S

    async def _connect(self, endpoint: Endpoint) -> None:
        shared = self.transport == "auto" and endpoint.node == self.node
        try:
            channel = await self._open(endpoint, shared)
            await self._probe(channel)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - refused, not there (yet / any more), hung
            self._back_off(endpoint, f"cannot open a channel: {type(e).__name__}: {e}")
            return
        self._failing.pop(endpoint.replica, None)
        self.pending.append(channel)
        self.opened += 1
        log.info("data-plane channel to shard %d replica %s opened (%s)", endpoint.shard, endpoint.replica,
                 "shared memory" if shared else f"tcp {endpoint.host}:{endpoint.port}")

    async def _open(self, endpoint: Endpoint, shared: bool) -> Channel:
        """`open_channel` on a thread; a channel opened after its caller gave up is closed, not leaked."""
        future = self._executor.submit(open_channel, endpoint, self.spec, shared)
        try:
            channel = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(_close_result)
            raise
        channel.attach(asyncio.get_running_loop())
        return channel

    async def _probe(self, channel: Channel) -> None:
        """One row of padding (no expert computes it) through the whole path, answered within
        `PROBE_TIMEOUT_S`; an error the shard's own code raised still proves it answers."""
        x = torch.zeros(1, self.spec.dim, dtype=self.spec.dtype)
        ids = torch.full((1, self.spec.max_slots), -1, dtype=torch.long)
        gates = torch.zeros(1, self.spec.max_slots, dtype=self.spec.dtype)
        try:
            await channel.call(0, x, ids, gates, (), torch.zeros_like(x), None,
                               deadline=time.perf_counter() + PROBE_TIMEOUT_S)
        except RemoteError:
            pass
        except BaseException:
            channel.close()
            raise
        channel.forget_timing()

    def close(self) -> None:
        """Stop discovery and close every channel (idempotent; also from `__del__` once the loop is gone)."""
        for task in [self._task, *self._connecting.values()]:
            if task is not None:
                try:
                    task.cancel()
                except RuntimeError:  # its event loop is closed: nothing runs it any more
                    pass
        for c in self._channels():
            c.close()
        self.pending, self.table = [], [[] for _ in self.table]
        self._executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        return {"channels": [len(self.links(s)) for s in range(len(self.table))],
                "channels_opened": self.opened, "channels_closed": self.closed_channels}


def _close_result(future: concurrent.futures.Future[Channel]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()
