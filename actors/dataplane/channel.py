"""The dispatcher's end of the data plane: one channel per (dispatcher, shard replica) pair.

`open_channel` connects to a shard replica's `ShardEndpoint` (blocking; run it off the event loop)
and returns a `Channel`. A call on it is sent at once (`start`, no task or future of its own) and
reports to a `Gather` (`actors/dataplane/gather.py`) when its answer is in: `ShardedExperts` sends
all of a layer's calls, then waits once for all of them; `call` does the same for one call.
Two kinds (`open_channel` in `actors/dataplane/table.py` picks one): `SharedChannel` (same node,
`actors/dataplane/shm.py`: a shared `memfd` region and eventfds, replies polled briefly by `spin_replies`)
and `SocketChannel` (other nodes, or `transport="socket"`: the same frame on a TCP stream,
`actors/dataplane/tcp.py`). No pickling, no buffers allocated per call.

Faults (`actors/faults.py`): any error on a channel ends it. A peer's death is noticed at once (the
Unix/TCP socket closes; TCP keepalive and `TCP_USER_TIMEOUT` for a vanished node or a half-open
connection); a call not answered by its deadline means a hung peer; a frame either side refuses, a
bad header or an OSError leaves the channel out of step. Each fails the channel (never reused) and
raises `PeerGoneError` with its kind, which the caller retries on another replica. An error the
shard's own code raised (`RemoteError`) keeps the channel in step and is not retried. A DRAIN from
the shard marks the channel `draining`: the caller stops using it and closes it between steps. The
channel interface is what a NCCL point-to-point channel would implement for GPUs (`docs/design.md`,
"The transport").
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moray.actors.dataplane.endpoint import TOKEN_BYTES, recv_exact
from moray.actors.dataplane.frames import (
    HEADER_BYTES,
    MAX_TAG_BYTES,
    FrameBuffer,
    FrameError,
    Header,
    Kind,
    RefusedError,
    RemoteError,
    capacity,
    dtype_code,
)
from moray.actors.dataplane.gather import Gather
from moray.actors.faults import FaultKind, PeerGoneError

__all__ = ["Channel", "ChannelSpec", "Endpoint", "PeerGoneError", "add_rows", "await_welcome"]

log = logging.getLogger(__name__)

SPIN_MAX_S = 300e-6  # the longest a step's last call polls for the replies before yielding to the loop
SPIN_MIN_S = 20e-6
FIRST_ANSWER_S = 1.0  # what a channel expects of its first call (the caller waits a multiple of it)
CONNECT_TIMEOUT_S = 2.0  # connect and HELLO/WELCOME: a replica that cannot shake hands in this is not usable

@dataclass(frozen=True)
class Endpoint:
    """Where one shard replica takes channels, as it announced itself (`ShardEndpoint.address()`)."""

    shard: int
    replica: str
    node: str | None
    unix: str
    host: str
    port: int
    token: str
    pid: int

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Endpoint:
        return cls(int(d["shard"]), str(d["replica"]), d.get("node") and str(d["node"]),  # type: ignore
                   str(d["unix"]), str(d["host"]), int(d["port"]), str(d["token"]), int(d["pid"]))  # type: ignore


@dataclass(frozen=True)
class ChannelSpec:
    """What the dispatcher sends on every channel: the largest frame and the hidden states' shape."""

    max_rows: int
    dim: int
    dtype: torch.dtype
    max_slots: int = 2

    def hello(self, token: str) -> bytearray:
        buf = bytearray(HEADER_BYTES + TOKEN_BYTES)
        Header(Kind.HELLO, 0, -1, self.max_rows, self.max_slots, self.dim, dtype_code(self.dtype), 0, 0,
               TOKEN_BYTES).pack_into(memoryview(buf))
        buf[HEADER_BYTES:] = bytes.fromhex(token)[:TOKEN_BYTES].ljust(TOKEN_BYTES, b"\0")
        return buf

    @property
    def capacity(self) -> int:
        return capacity(self.max_rows, self.dim, self.dtype, self.max_slots)


def add_rows(out: torch.Tensor, rows: torch.Tensor | None, y: torch.Tensor) -> None:
    """out[rows] += y (every row when `rows` is None): a shard's answer added into the layer's output."""
    y = y.to(out.device)
    if rows is None:
        out.add_(y)
    else:
        out.index_add_(0, rows.to(out.device), y)


def await_welcome(sock: socket.socket, endpoint: Endpoint) -> None:
    buf = bytearray(HEADER_BYTES + 4096)
    if not recv_exact(sock, memoryview(buf)[:HEADER_BYTES]):
        raise PeerGoneError(f"shard {endpoint.shard} replica {endpoint.replica} closed during the handshake")
    h = Header.unpack(memoryview(buf))
    if h.kind in (Kind.ERROR, Kind.REFUSED):
        recv_exact(sock, memoryview(buf)[HEADER_BYTES:HEADER_BYTES + min(h.payload, 4096)])
        why = FrameBuffer(memoryview(buf)).message(h)
        raise RemoteError(f"shard {endpoint.shard} refused the channel: {why}")
    if h.kind != Kind.WELCOME:
        raise FrameError(f"expected WELCOME, got {Kind(h.kind).name}")




class Channel:
    """One channel: its calls run one at a time, on the event loop it is attached to.

    A call is sent (`start`, or `call`, which waits its turn when the channel is held), reports to a
    `Gather` when its answer is in or it failed, and ends with `finish` (read the answer, add it into the
    caller's output) or `abandon`."""

    def __init__(self, endpoint: Endpoint, spec: ChannelSpec, sock: socket.socket) -> None:
        self.endpoint, self.spec, self.sock = endpoint, spec, sock
        self.seq = 0
        self.dead: str | None = None  # why it cannot be used any more
        self.fault: FaultKind | None = None  # what ended it, when a fault did (not a close or a cancel)
        self.draining = False
        self.in_flight = 0
        self.calls, self.busy_s = 0, 0.0
        self.round_trip_s = SPIN_MIN_S  # moving average: how long this channel's answers take
        self.rows_avg = 1.0  # moving average of the rows per call, to scale `round_trip_s` by
        self.deadline = math.inf  # the call out's: its answer must be in by then (`time.perf_counter()`)
        self._closed = False
        self._held = False  # a call holds the channel (from its send to its finish)
        self._turns: deque[asyncio.Future[None]] = deque()  # calls waiting to hold it, in order
        self._gather: Gather | None = None  # where the call out reports
        self._reported = False
        self._error: BaseException | None = None  # the call out's fault, once reported
        self._started = 0.0
        self._reply: tuple[int, int, torch.dtype] = (0, 0, spec.dtype)  # rows, dim, dtype expected back
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def usable(self) -> bool:
        return self.dead is None and not self.draining

    @property
    def reported(self) -> bool:
        return self._reported

    def expected_s(self, rows: int) -> float:
        """How long an answer for `rows` rows should take, from this channel's recent round trips
        (`FIRST_ANSWER_S` before its first call, which may be a prefill of thousands of rows)."""
        if not self.calls:
            return FIRST_ANSWER_S
        return self.round_trip_s * max(1.0, rows / self.rows_avg)

    def forget_timing(self) -> None:
        """Start the round-trip statistics afresh (after a probe, which computes nothing)."""
        self.calls, self.busy_s, self.round_trip_s, self.rows_avg = 0, 0.0, SPIN_MIN_S, 1.0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching the socket on `loop` (the loop `call` will be awaited on)."""
        self._loop = loop
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._readable)
        self._attached(loop)

    def _attached(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    # ---- one call: held, sent, reported, finished ------------------------------------------------
    def start(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
              tags: Sequence[str], rows: torch.Tensor | None, deadline: float, gather: Gather) -> bool:
        """Send the rows `rows` of the layer's x [T, D] (every row when None; gathered straight into the
        frame) with their expert ids and gates [n, k], now, if no other call holds the channel (False:
        use `call`, which waits its turn). Its answer, or its fault, is reported to `gather`; then
        `finish` (or `abandon`) ends the call. Raises `PeerGoneError` if the channel is dead (nothing
        sent)."""
        if self._held or self._turns:
            return False
        self._held = True
        self.in_flight += 1
        try:
            self._send(layer, x, expert_ids, gates, tags, rows, deadline, gather)
        except BaseException:
            self._end()
            raise
        return True

    async def call(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                   tags: Sequence[str], out: torch.Tensor, rows: torch.Tensor | None,
                   spin: bool = False, deadline: float = math.inf) -> None:
        """One call, in turn after the calls before it: send (as `start`), await the answer and add it into
        `out` at `rows`. `tags` (the step's request ids, sent with layer 0) are for the shard's logs;
        `spin`: poll for the answers briefly before yielding to the event loop (for the last call of a
        step to be sent). No answer by `deadline` (`time.perf_counter()`): the peer is hung. Raises
        `PeerGoneError` on any fault (the channel is then dead), `RemoteError` when the shard's own code
        raised."""
        assert self._loop is not None, "attach() the channel to the event loop first"
        gather = Gather(self._loop)
        self.in_flight += 1
        try:
            await self._hold()
        except BaseException:
            self.in_flight -= 1
            raise
        try:
            self._send(layer, x, expert_ids, gates, tags, rows, deadline, gather)
        except BaseException:
            self._end()
            raise
        try:
            if spin:
                self._spin()
            await gather.wait()
        except asyncio.CancelledError:
            self.abandon()
            raise
        self.finish(out, rows)

    async def _hold(self) -> None:
        """Wait until this call holds the channel (calls on a channel run one at a time, in order)."""
        if not self._held and not self._turns:
            self._held = True
            return
        assert self._loop is not None
        turn = self._loop.create_future()
        self._turns.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # handed to us just as we gave up
            elif turn in self._turns:
                self._turns.remove(turn)
            raise

    def _release(self) -> None:
        while self._turns:
            turn = self._turns.popleft()
            if not turn.done():
                turn.set_result(None)  # handed on: the channel stays held
                return
        self._held = False

    def _send(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
              tags: Sequence[str], rows: torch.Tensor | None, deadline: float, gather: Gather) -> None:
        if self.dead:
            raise PeerGoneError(self._named(self.dead), self.fault or "died")
        self._started = time.perf_counter()
        data = "\n".join(tags).encode()[:MAX_TAG_BYTES] if tags else b""
        seq = self.seq + 1
        n = self._write(seq, layer, x, expert_ids, gates, data, rows)  # raises: nothing was sent
        self.seq = seq
        self.deadline, self._reply = deadline, (len(expert_ids), x.shape[1], x.dtype)
        self._gather, self._reported, self._error = gather, False, None
        gather.add(self)
        self._signal(n)  # a fault here fails the channel, which reports the call

    def finish(self, out: torch.Tensor, rows: torch.Tensor | None, assign: bool = False) -> None:
        """End a reported call: add its answer into `out` at `rows` (`assign`: copy it into all of `out`,
        when `rows` is None). Raises its fault (`PeerGoneError`, the
        channel then dead) or `RemoteError` (the shard's own code raised; the channel stays in step)."""
        try:
            if self._error is not None:
                raise self._error
            try:
                y = self._read_reply(*self._reply)
            except RemoteError:
                raise
            except FrameError as e:  # a refused or malformed frame: out of step
                why = str(e) if isinstance(e, RefusedError) else f"bad frame from the shard: {e}"
                raise self.fail(why, "refused") from None
            if assign and rows is None:
                out.copy_(y)
            else:
                add_rows(out, rows, y)
            took, weight = time.perf_counter() - self._started, 0.2 if self.calls else 1.0
            self.calls += 1
            self.busy_s += took
            self.round_trip_s += weight * (took - self.round_trip_s)
            self.rows_avg += weight * (self._reply[0] - self.rows_avg)
        finally:
            self._end()

    def abandon(self) -> None:
        """End a call whose answer nobody will read (the layer failed or was cancelled): unless it was
        answered, the channel is out of step and fails."""
        if not self._reported:
            self.fail("a call was abandoned (cancelled): the channel is out of step")
        self._end()

    def _end(self) -> None:
        self._gather, self._error = None, None
        self._resume()
        self.in_flight -= 1
        self._release()

    def _write(self, seq: int, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
               tags: bytes, rows: torch.Tensor | None) -> int:
        """Write the request frame into the outgoing buffer; its length."""
        raise NotImplementedError

    def _signal(self, n: int) -> None:
        """Send the written frame (n bytes) without waiting; a fault fails the channel."""
        raise NotImplementedError

    def _answered(self) -> bool:
        """Whether the answer to the call in flight is in the reply buffer already."""
        return False

    def _read_reply(self, rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """The answer y [rows, dim], a view into the reply buffer."""
        raise NotImplementedError

    def _resume(self) -> None:
        """After a call: be ready for the next frame from the peer."""

    def expire(self) -> None:
        """The call's deadline passed (its `Gather`'s timer): the peer is hung, unless the answer is there."""
        if self._gather is None or self._reported:
            return  # answered just in time
        if self._answered():
            log.warning("data-plane channel to %s: the answer was there without its signal",
                        self._named(f"seq {self.seq}"))
            self._wake()
            return
        waited = time.perf_counter() - self.deadline
        self.fail(f"no answer by the call's deadline (+{waited * 1e3:.0f} ms; round trip "
                  f"{self.round_trip_s * 1e3:.1f} ms): the replica is hung or too slow", "hung")

    def _named(self, why: str) -> str:
        return f"shard {self.endpoint.shard} replica {self.endpoint.replica}: {why}"

    def fail(self, why: str, kind: FaultKind | None = None) -> PeerGoneError:
        """Mark the channel dead (its peer is gone, hung or out of step; `kind` None: we gave it up) and
        report a call out with the fault. Returns the error to raise."""
        if self.dead is None:
            self.dead, self.fault = why, kind
            if kind is not None:
                log.warning("data-plane channel to %s (%s)", self._named(why), kind)
        error = PeerGoneError(self._named(why), self.fault or "died")
        self._wake(error)
        return error

    def _wake(self, error: BaseException | None = None) -> None:
        """The call out has its answer, or `error`: report it to its gather (once)."""
        gather = self._gather
        if gather is None or self._reported:
            return
        self._reported, self._error = True, error
        self._not_waiting()
        gather.report(self, error is not None)

    def _not_waiting(self) -> None:
        """Its call is answered or failed: nothing more to poll for it (shared memory keeps a set)."""

    def _spin(self) -> None:
        """Poll briefly for the answers before yielding to the event loop (shared memory only)."""

    def _readable(self) -> None:
        raise NotImplementedError

    def _unwatch(self, fd: int | None = None) -> None:
        """Stop watching `fd` (the socket when None) on the event loop, if it still runs."""
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self.sock.fileno() if fd is None else fd)
            except (ValueError, OSError):
                pass

    def close(self) -> None:
        """Close the channel and everything it holds (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.dead = self.dead or "closed"
        self._wake(PeerGoneError(self._named("closed"), self.fault or "died"))
        self._unwatch()
        self.sock.close()
