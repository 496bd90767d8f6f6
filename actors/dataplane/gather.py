"""One wait for all of a layer's calls: the "finish-all" half of the dispatcher's per-layer hop.

`ShardedExperts` sends every shard's frame first (`Channel.start`), then waits once, on a `Gather`: each
call's channel reports here when its answer is in (the event loop's reader callback, or the poll of a
spinning caller) or when it failed. `wait` returns when every call has reported, or as soon as one has
failed (so its rows go to a sibling replica at once, while the others still compute). One future per
wait and one timer, at the earliest deadline of the calls still out: when it fires, each call past its
deadline is expired (its channel fails as hung, which reports it), and the timer is set again for the
rest. No task per call, no timer per call.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Protocol

DEADLINE_SLACK_S = 1e-3  # the loop's clock and perf_counter differ by a little: a timer may fire early


class Pending(Protocol):
    """A call a `Gather` waits for (a `Channel` while it has a call out)."""

    deadline: float  # time.perf_counter() by which its answer must be in

    @property
    def reported(self) -> bool: ...

    def expire(self) -> None:
        """Its deadline passed: fail it (hung), or take an answer that arrived without its signal."""


class Gather:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: list[Pending] = []
        self.left = 0  # calls not reported yet
        self.ready: list[Pending] = []  # reported, not taken by the caller yet
        self.failures = 0  # failures among `ready`
        self._future: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(self, call: Pending) -> None:
        self.calls.append(call)
        self.left += 1

    def report(self, call: Pending, failed: bool) -> None:
        """`call` has its answer (`failed`: its fault); called once per call, on the loop's thread."""
        self.left -= 1
        self.ready.append(call)
        self.failures += failed
        future = self._future
        if future is not None and not future.done() and (failed or not self.left):
            future.set_result(None)

    def wake(self) -> None:
        """End the current `wait` early (something else failed: the caller stops waiting)."""
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def take(self) -> list[Pending]:
        """The calls reported since the last `take`."""
        ready, self.ready, self.failures = self.ready, [], 0
        return ready

    async def wait(self) -> None:
        """Until every call has reported, or one has failed since the last `take`."""
        if not self.left or self.failures:
            return
        self._future = self.loop.create_future()
        self._arm()
        try:
            await self._future
        finally:
            self._future = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _arm(self) -> None:
        deadline = min((c.deadline for c in self.calls if not c.reported), default=math.inf)
        if deadline != math.inf:
            self._timer = self.loop.call_later(max(deadline - time.perf_counter(), 0.0), self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = time.perf_counter() + DEADLINE_SLACK_S
        for call in [c for c in self.calls if not c.reported and c.deadline <= now]:
            call.expire()
        if self._future is not None and not self._future.done():
            self._arm()
