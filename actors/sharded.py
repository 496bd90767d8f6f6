"""How hidden states travel between the dispatcher and the expert shards.

`ShardedExperts` is the dispatcher's `ExpertBackend`: per layer it routes each token's top-2
experts to the shards that own them (`Placement.route`), sends every involved shard its rows (each
token once per shard, in the model dtype) split over the shard's live replicas, and adds the partial
outputs back (`index_add_`). Over the data plane a layer is one pass (`Hop`): every frame goes out,
then one wait (a `Gather`) collects every answer. Where the rows travel is a table of links per shard:

- `DataPlane` (`actors/dataplane/table.py`, transport "auto" or "socket", the default): a channel per
  shard replica, shared memory on the same node and TCP across nodes; Ray is only the control
  plane (endpoints announced in the GCS, replicas started and stopped by Ray or Serve).
- `HandleLinks` (transport "ray"): one Ray actor or Serve `DeploymentHandle` call per shard per
  layer (`.serve.remote(layer, x, ids, gates, tags)`), as before the data plane; kept so the two can
  be measured side by side.

Faults (`actors/faults.py`): each attempt has a deadline of its own, `HUNG_FACTOR` times what the
channel's recent round trips say its rows take, and at least `hung_after_s`, so a hung replica is told
from a slow one in seconds, not a minute. A call whose replica died, hung or refused the frame
(`fault_kind`) is retried at once on another usable replica of the shard (or waits for a new one)
until `shard_timeout_s` after the call began; then `ShardUnavailableError` (HTTP 503). Faults are
counted per (shard, kind) in `stats()["shard_faults"]` (`moray_shard_faults_total`). When a call fails
for good, the step's other calls are cancelled, and the layer returns only once every call has.

The placement itself can change while serving (online re-placement, `actors/replacement.py`): a new one
is staged from any thread and routes from the first moment no expert call is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from moray.actors.dataplane.channel import Channel, add_rows
from moray.actors.dataplane.gather import Gather
from moray.actors.dataplane.shm import spin_replies
from moray.actors.faults import FaultKind, PeerGoneError, ShardUnavailableError, busy, fault_kind
from moray.actors.placement import Placement, split_among_replicas
from moray.model.engine import STEP_REQUESTS
from moray.model.experts import split_by_shard

__all__ = ["HandleLinks", "Link", "Links", "ShardUnavailableError", "ShardedExperts"]

log = logging.getLogger(__name__)

HUNG_FACTOR = 10.0  # an attempt waits this many times the channel's expected round trip ...
HUNG_AFTER_S = 2.0  # ... and at least this long, before its replica counts as hung


class Link(Protocol):
    async def call(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                   tags: Sequence[str], out: torch.Tensor, rows: torch.Tensor | None,
                   spin: bool = False, deadline: float = math.inf) -> None:
        """Send the rows `rows` of the layer's x [T, D] (all of them when None) with their expert ids
        [n, k] and gates [n, k]; add y [n, D] into out[rows]. `spin`: this is the step's last call to
        go out, it may poll for its answer. No answer by `deadline` (`time.perf_counter()`): a fault."""

    def expected_s(self, rows: int) -> float:
        """How long an answer for `rows` rows should take (inf: unknown, the whole budget bounds it)."""


class Links(Protocol):
    """A shard's ways to its replicas: the data plane's channels, or Ray/Serve handles."""

    max_rows: int

    def links(self, shard: int) -> Sequence[Link]: ...
    async def pick(self, shard: int, deadline: float, attempt: int) -> Link | None: ...
    def between_steps(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...


class HandleLink:
    """One Ray actor or Serve deployment handle: a remote call per layer."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def call(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                   tags: Sequence[str], out: torch.Tensor, rows: torch.Tensor | None,
                   spin: bool = False, deadline: float = math.inf) -> None:
        xs = x if rows is None else x.index_select(0, rows.to(x.device))
        response = self.handle.serve.remote(layer, xs, expert_ids, gates, tuple(tags))
        try:
            async with _timeout(max(deadline - time.perf_counter(), 1e-3)):
                y = await response
        except (asyncio.CancelledError, asyncio.TimeoutError) as e:
            if hasattr(response, "cancel"):  # a Serve DeploymentResponse (a Ray ObjectRef has none)
                response.cancel()
            if isinstance(e, asyncio.TimeoutError):
                raise PeerGoneError("no answer by the call's deadline", "hung") from None
            raise
        except Exception as e:
            if busy(e):  # the shard's queue is full: another try after a back-off
                raise PeerGoneError(f"refused: {e}", "refused") from None
            raise
        add_rows(out, rows, y)

    def expected_s(self, rows: int) -> float:
        return math.inf  # Serve's router picks the replica: only the whole budget bounds a call


class HandleLinks:
    """Transport "ray": each shard's handle, called once per live replica (Serve routes the calls)."""

    max_rows = 1 << 30

    def __init__(self, handles: Sequence[Any]) -> None:
        self.handles = [HandleLink(h) for h in handles]
        self.replicas = [1] * len(handles)  # live replicas per shard (the served dispatcher updates it)

    def links(self, shard: int) -> list[HandleLink]:
        return [self.handles[shard]] * self.replicas[shard]

    async def pick(self, shard: int, deadline: float, attempt: int) -> HandleLink | None:
        if attempt:  # Serve or Ray is restarting the replica: back off, up to 2 s
            delay = min(0.1 * 2 ** (attempt - 1), 2.0)
            if time.perf_counter() + delay > deadline:
                return None
            await asyncio.sleep(delay)
        return self.handles[shard]

    def between_steps(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


if sys.version_info >= (3, 11):
    _timeout = asyncio.timeout  # a timer on the running task: no extra task per call, as wait_for makes
else:  # pragma: no cover - Python 3.10

    @contextlib.asynccontextmanager
    async def _timeout(seconds: float) -> AsyncIterator[None]:
        task = asyncio.current_task()
        assert task is not None
        timer = asyncio.get_running_loop().call_later(seconds, task.cancel)
        try:
            yield
        except asyncio.CancelledError as e:
            raise asyncio.TimeoutError from e
        finally:
            timer.cancel()


class ShardedExperts:
    def __init__(self, placement: Placement, links: Links, shard_timeout_s: float = 60.0,
                 version: int = 0, hung_after_s: float = HUNG_AFTER_S) -> None:
        self.placement, self.links, self.shard_timeout_s = placement, links, shard_timeout_s
        self.hung_after_s = hung_after_s
        self.version = version  # the placement board's version of `placement` (0: no board)
        self.num_shards = placement.num_shards
        self.min_split_rows = 4
        self.calls = [0] * self.num_shards
        self.call_s = [0.0] * self.num_shards
        self.retries = 0
        self.faults: dict[tuple[int, FaultKind], int] = {}  # (shard, kind) -> faults met
        self.in_flight = 0
        self._staged: tuple[int, Placement] | None = None
        self._turns: dict[int, np.ndarray] = {}  # layer -> [E]: where each expert's copies rotation stands
        self._switch = threading.Lock()  # the board's follower thread stages; the event loop routes

    def stage(self, version: int, placement: Placement) -> None:
        """Route with `placement` from the next moment no expert call is in flight (at once if none is).
        Any thread. Afterwards no call routed with the old placement is left (`version` says when)."""
        if placement.num_shards != self.num_shards:
            raise ValueError(f"placement v{version} has {placement.num_shards} shards, this dispatcher "
                             f"{self.num_shards}")
        with self._switch:
            self._staged = (version, placement)
            self._apply_staged()

    @property
    def staged_version(self) -> int | None:
        staged = self._staged
        return staged[0] if staged else None

    def _apply_staged(self) -> None:
        """Switch to the staged placement if nothing is in flight (the caller holds `_switch`)."""
        if self._staged is not None and self.in_flight == 0:
            (version, placement), self._staged = self._staged, None
            log.info("dispatcher routes with placement v%d (was v%d)", version, self.version)
            self.version, self.placement = version, placement

    async def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor,
                       gates: torch.Tensor) -> torch.Tensor:
        if layer == 0 and self.in_flight == 0:
            self.links.between_steps()  # the table of replicas changes only between steps
        with self._switch:
            self._apply_staged()
            placement = self.placement
            self.in_flight += 1
        try:
            return await self._layer(placement, layer, x, ids, gates)
        finally:
            with self._switch:
                self.in_flight -= 1

    async def _layer(self, placement: Placement, layer: int, x: torch.Tensor, ids: torch.Tensor,
                     gates: torch.Tensor) -> torch.Tensor:
        ids_np = ids.detach().to("cpu", torch.long).numpy()  # routing is index work on the CPU, in numpy
        turn = self._turns.get(layer)
        if turn is None or len(turn) != placement.num_experts:
            turn = self._turns[layer] = np.zeros(placement.num_experts, dtype=np.int64)
        parts = split_by_shard(ids_np, gates, placement.shards_of(layer, ids_np, turn), self.num_shards)
        tags = STEP_REQUESTS.get() if layer == 0 else ()  # request ids reach the shards' logs once a step
        jobs: list[Job] = []
        for s, (rows, sids, sgates) in enumerate(parts):
            n = rows.shape[0]
            if n == 0:
                continue
            links = self.links.links(s)
            chunks = self._split(n, len(links))
            if len(chunks) == 1:  # the usual case: one replica takes all of the shard's rows
                whole = None if n == x.shape[0] else rows
                jobs.append(Job(s, links[0] if links else None, whole, sids, sgates))
                continue
            for i, c in enumerate(chunks):
                jobs.append(Job(s, links[i % len(links)], rows[c], sids[c], sgates[c]))
        return await Hop(self, layer, x, tags).run(jobs)

    def _split(self, n: int, links: int) -> list[slice]:
        """A shard's n rows in chunks: one per live replica, none larger than a frame."""
        k = max(1, min(links, n // self.min_split_rows), -(-n // self.links.max_rows))
        if k == 1:
            return [slice(0, n)]
        sizes = split_among_replicas(n, [0.0] * k)
        bounds = [sum(sizes[:i]) for i in range(k + 1)]
        return [slice(bounds[i], bounds[i + 1]) for i in range(k)]

    def patience(self, link: Link, rows: int) -> float:
        """How long an attempt on `link` waits for `rows` rows before its replica counts as hung."""
        return max(self.hung_after_s, HUNG_FACTOR * link.expected_s(rows))

    def attempt_deadline(self, start: float, link: Link, rows: int) -> float:
        """When an attempt begun now on `link` has failed: its `patience`, but no later than `shard_timeout_s`
        after its call began (`start`)."""
        return min(start + self.shard_timeout_s, time.perf_counter() + self.patience(link, rows))

    def fault(self, shard: int, error: BaseException) -> None:
        """Count a replica's fault (the caller retries the rows); raise `error` if it is not one."""
        kind = fault_kind(error)
        if kind is None:
            raise error
        self.retries += 1
        self.faults[(shard, kind)] = self.faults.get((shard, kind), 0) + 1
        log.warning("expert shard %d call failed (%s: %s); retrying", shard, kind, str(error))

    def answered(self, shard: int, start: float) -> None:
        self.calls[shard] += 1
        self.call_s[shard] += time.perf_counter() - start

    async def _call(self, shard: int, link: Link | None, layer: int, x: torch.Tensor, ids: torch.Tensor,
                    gates: torch.Tensor, tags: Sequence[str], out: torch.Tensor, rows: torch.Tensor | None,
                    spin: bool, start: float | None = None, attempt: int = 0) -> None:
        """One call with its retries: until a replica answers, or `shard_timeout_s` after `start` (a retry
        of a call `Hop` sent: `attempt` 1)."""
        start = time.perf_counter() if start is None else start
        deadline = start + self.shard_timeout_s
        while True:
            if link is None or attempt:
                link = await self.links.pick(shard, deadline, attempt)
            if link is None or (attempt and time.perf_counter() >= deadline):
                raise ShardUnavailableError(
                    f"no replica of expert shard {shard} answered within {self.shard_timeout_s:g} s")
            try:
                await link.call(layer, x, ids, gates, tags, out, rows, spin,
                                self.attempt_deadline(start, link, ids.shape[0]))
                break
            except Exception as e:
                self.fault(shard, e)
                attempt += 1
        self.answered(shard, start)

    def stats(self) -> dict[str, Any]:
        return {"shard_calls": list(self.calls), "shard_call_s": list(self.call_s),
                "shard_retries": self.retries, "placement_version": self.version,
                "shard_faults": [[shard, kind, n] for (shard, kind), n in sorted(self.faults.items())],
                **self.links.stats()}


class Job(NamedTuple):
    """One call of a layer: a chunk of a shard's rows (rows of x; None: all) for one of its replicas."""

    shard: int
    link: Link | None
    rows: torch.Tensor | None
    ids: torch.Tensor  # [n, k]
    gates: torch.Tensor  # [n, k]


class Hop:
    """One layer's hop: send every call's frame at once, then wait once for all the answers (a `Gather`),
    adding each into y. A call whose channel is held by another micro-batch, or whose link is not a data-
    plane channel (Ray/Serve handles), runs as a task of its own (`ShardedExperts._call`), as does the
    retry of a call whose replica died, hung or refused its frame. When one call fails for good, every
    other is abandoned or cancelled, and `run` returns only once none is left.

    y [T, D] is the one tensor a layer allocates (the caller keeps it). It is not zero-filled when the
    first answer to arrive covers every row of x (the usual decode case: one chunk per shard): that
    answer is copied in, the others added."""

    def __init__(self, experts: ShardedExperts, layer: int, x: torch.Tensor, tags: Sequence[str]) -> None:
        self.experts, self.layer, self.x, self.tags = experts, layer, x, tags
        self.y, self.blank = torch.empty_like(x), True  # blank: nothing written into y yet
        self.loop = asyncio.get_running_loop()
        self.gather = Gather(self.loop)
        self.sent: dict[Channel, tuple[Job, float]] = {}  # calls out on the data plane -> (job, start)
        self.tasks: list[asyncio.Future[None]] = []

    async def run(self, jobs: Sequence[Job]) -> torch.Tensor:
        try:
            for job in jobs:
                self._send(job)
            if self.sent:
                spin_replies(self.loop)  # a fast shard's answers are in within µs: poll before sleeping
            while self.sent:  # calls out, or answered and not added in yet
                self._raise_failed()
                await self.gather.wait()
                for channel in self.gather.take():
                    self._finish(channel)  # type: ignore[arg-type]
            if self.tasks:
                await asyncio.gather(*self.tasks)
            self._zeroed()  # no answer at all (no rows): y is zeros
            return self.y
        except BaseException:
            for channel in self.sent:
                channel.abandon()
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            raise

    def _send(self, job: Job) -> None:
        link, start = job.link, time.perf_counter()
        if isinstance(link, Channel) and link.usable:
            experts = self.experts
            try:
                sent = link.start(self.layer, self.x, job.ids, job.gates, self.tags, job.rows,
                                  experts.attempt_deadline(start, link, len(job.ids)), self.gather)
            except PeerGoneError as e:  # dead since the table was read: retry at once
                experts.fault(job.shard, e)
                return self._retry(job, start)
            if sent:
                self.sent[link] = (job, start)
                return
        self._task(self.experts._call(job.shard, link, self.layer, self.x, job.ids, job.gates, self.tags,
                                      self.y, job.rows, False))

    def _finish(self, channel: Channel) -> None:
        job, start = self.sent.pop(channel)
        if job.rows is not None:
            self._zeroed()
        try:
            channel.finish(self.y, job.rows, assign=self.blank)
            self.blank = False
        except PeerGoneError as e:
            self.experts.fault(job.shard, e)
            return self._retry(job, start)
        self.experts.answered(job.shard, start)

    def _retry(self, job: Job, start: float) -> None:
        self._task(self.experts._call(job.shard, None, self.layer, self.x, job.ids, job.gates, self.tags,
                                      self.y, job.rows, False, start, attempt=1))

    def _zeroed(self) -> None:
        """Before anything is added into y: zero it."""
        if self.blank:
            self.y.zero_()
            self.blank = False

    def _task(self, call: Coroutine[Any, Any, None]) -> None:
        self._zeroed()  # the task adds its answer into y
        task = asyncio.ensure_future(call)
        task.add_done_callback(self._task_done)
        self.tasks.append(task)

    def _task_done(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.gather.wake()  # a call failed for good: stop waiting for the others

    def _raise_failed(self) -> None:
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
