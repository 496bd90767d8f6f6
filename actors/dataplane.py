"""The dispatcher's table of data-plane channels, one per live shard replica, kept in step with the
directory (`actors/directory.py`) by a discovery task on the engine's event loop.

- New replicas: every `DISCOVER_S` the task lists the announced endpoints and opens a channel to each
  replica it has none to (shared memory on the same node unless `transport="socket"`, TCP across
  nodes). New channels join the table only between steps (`between_steps`), so a step's rows never
  move mid-layer, except for a shard that has no usable channel at all: its callers are waiting.
- Gone replicas: a channel whose peer died fails its call at once (`PeerGoneError`); the caller
  retries the rows on another usable channel of the shard, or waits here for a new replica until its
  deadline. A draining replica (Serve is stopping it) is left out of new calls and closed between
  steps, which is what its `drain()` waits for.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Literal

from moray.actors.channel import Channel, ChannelSpec, Endpoint, PeerGoneError, open_channel
from moray.actors.directory import STALE_S, Directory

log = logging.getLogger(__name__)

DISCOVER_S = 1.0  # how often the directory is read while every shard has a channel
WAIT_POLL_S = 0.05  # how often a caller with no usable channel looks again
RETRY_CONNECT_S = 2.0  # between connection attempts to a replica that refused or was not there

Transport = Literal["auto", "socket", "ray"]


class DataPlane:
    def __init__(self, directory: Directory, spec: ChannelSpec, num_shards: int, *, node: str | None,
                 transport: Transport = "auto") -> None:
        if transport not in ("auto", "socket"):
            raise ValueError(f"a data plane carries transport 'auto' or 'socket', not {transport!r}")
        self.directory, self.spec, self.node, self.transport = directory, spec, node, transport
        self.table: list[list[Channel]] = [[] for _ in range(num_shards)]
        self.pending: list[Channel] = []
        self._failing: dict[str, tuple[float, float]] = {}  # replica -> (first failure, last attempt)
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

    def retryable(self, error: BaseException) -> bool:
        return isinstance(error, PeerGoneError)

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

    def _close(self, c: Channel) -> None:
        c.close()
        self.closed_channels += 1
        log.info("data-plane channel to shard %d replica %s closed (%s)", c.endpoint.shard,
                 c.endpoint.replica, "drained" if c.draining else c.dead)

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
        """Open a channel to every announced replica that has none."""
        announced = await asyncio.to_thread(self.directory.endpoints)
        known = {c.endpoint.replica for c in self.pending} | {
            c.endpoint.replica for row in self.table for c in row if c.dead is None}
        for raw in announced:
            endpoint = Endpoint.from_dict(raw)
            if endpoint.replica in known or not 0 <= endpoint.shard < len(self.table):
                continue
            if self._too_soon(endpoint.replica):
                continue
            await self._connect(endpoint)

    def _too_soon(self, replica: str) -> bool:
        return time.monotonic() - self._failing.get(replica, (0.0, 0.0))[1] < RETRY_CONNECT_S

    async def _connect(self, endpoint: Endpoint) -> None:
        shared = self.transport == "auto" and endpoint.node == self.node
        try:
            channel = await asyncio.to_thread(open_channel, endpoint, self.spec, shared)
        except Exception as e:  # noqa: BLE001 - refused, not there (yet / any more)
            now = time.monotonic()
            first = self._failing.get(endpoint.replica, (now, now))[0]
            self._failing[endpoint.replica] = (first, now)
            if now - first > STALE_S:
                log.info("forgetting shard %d replica %s: unreachable for %.0f s (%s)", endpoint.shard,
                         endpoint.replica, now - first, e)
                await asyncio.to_thread(self.directory.retract, endpoint.shard, endpoint.replica)
                self._failing.pop(endpoint.replica, None)
            else:
                log.debug("cannot open a channel to shard %d replica %s yet: %s", endpoint.shard,
                          endpoint.replica, e)
            return
        self._failing.pop(endpoint.replica, None)
        channel.attach(asyncio.get_running_loop())
        self.pending.append(channel)
        self.opened += 1
        log.info("data-plane channel to shard %d replica %s opened (%s)", endpoint.shard, endpoint.replica,
                 "shared memory" if shared else f"tcp {endpoint.host}:{endpoint.port}")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for c in [*self.pending, *(c for row in self.table for c in row)]:
            c.close()
        self.pending, self.table = [], [[] for _ in self.table]

    def stats(self) -> dict[str, Any]:
        return {"channels": [len(self.links(s)) for s in range(len(self.table))],
                "channels_opened": self.opened, "channels_closed": self.closed_channels}


def chunk_count(n: int, links: int, max_rows: int, min_split_rows: int) -> int:
    """How many chunks a shard's n rows go in: one per usable link (at least `min_split_rows` rows
    each), and never a chunk larger than a channel's frame."""
    return max(1, min(links, n // min_split_rows), math.ceil(n / max_rows))
