"""The shared-memory channel (dispatcher and shard replica on one node).

The request is gathered into a pre-allocated shared `memfd` region and an eventfd is signalled; once a
layer's calls are out, `spin_replies` polls the reply eventfds of every call still waiting on the loop (a
few µs a round; a blocked wake-up costs ~27 µs on a VM and an event-loop turn more), for at most
`SPIN_MAX_S` and no longer than twice the recent round trip, so a shard that computes for milliseconds is
not spun for. What is not answered by then reports through the event loop (each reply eventfd is watched
by `add_reader` for the channel's life). No syscall beyond the two eventfd operations. The rest of a
channel's life (calls, deadlines, faults) is `Channel`'s (`actors/dataplane/channel.py`).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import socket
import time

import torch

from moray.actors.dataplane.channel import (
    CONNECT_TIMEOUT_S,
    SPIN_MAX_S,
    SPIN_MIN_S,
    Channel,
    ChannelSpec,
    Endpoint,
    await_welcome,
)
from moray.actors.dataplane.frames import HEADER_BYTES, FrameBuffer, FrameError, Header, Kind

log = logging.getLogger(__name__)


class SharedChannel(Channel):
    def __init__(self, endpoint: Endpoint, spec: ChannelSpec, sock: socket.socket, mm: mmap.mmap,
                 req_fd: int, rep_fd: int) -> None:
        super().__init__(endpoint, spec, sock)
        self.mm, self.req_fd, self.rep_fd = mm, req_fd, rep_fd
        cap = spec.capacity
        self.req = FrameBuffer(memoryview(mm)[:cap])
        self.rep = FrameBuffer(memoryview(mm)[cap:])
        self._control = bytearray(HEADER_BYTES)
        self._control_got = 0

    @classmethod
    def connect(cls, endpoint: Endpoint, spec: ChannelSpec) -> SharedChannel:
        fds: list[int] = []
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mm = None
        try:
            fds.append(os.memfd_create(f"moray-channel-{endpoint.shard}", os.MFD_CLOEXEC))
            fds += [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
            os.ftruncate(fds[0], 2 * spec.capacity)
            mm = mmap.mmap(fds[0], 2 * spec.capacity)
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect("\0" + endpoint.unix)
            socket.send_fds(sock, [bytes(spec.hello(endpoint.token))], fds)
            await_welcome(sock, endpoint)
        except BaseException:
            sock.close()
            for fd in fds[1:]:
                os.close(fd)
            if mm is not None:
                mm.close()
            raise
        finally:
            if fds:
                os.close(fds[0])  # the mapping keeps the segment; it goes when both ends unmap
        return cls(endpoint, spec, sock, mm, fds[1], fds[2])

    def _attached(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.rep_fd, self._replied)

    def _write(self, seq: int, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
               tags: bytes, rows: torch.Tensor | None) -> int:
        return self.req.write_request(seq, layer, x, expert_ids, gates, tags, rows)

    def _signal(self, n: int) -> None:
        try:
            os.eventfd_write(self.req_fd, 1)
        except OSError as e:
            self.fail(f"request eventfd: {e}", "died")
            return
        _waiting.add(self)

    def _read_reply(self, rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        return self.rep.read_reply(self.seq, rows, dim, dtype)

    def _answered(self) -> bool:
        try:
            h = Header.unpack(self.rep.buf)
        except FrameError:
            return False
        return h.seq == self.seq and h.kind in (Kind.REPLY, Kind.ERROR, Kind.REFUSED)

    def _poll(self) -> bool:
        """Whether the call out has its answer (reporting it if so)."""
        if self._gather is None or self._reported:
            return True
        try:
            os.eventfd_read(self.rep_fd)
        except BlockingIOError:
            return False
        self._wake()
        return True

    def _replied(self) -> None:
        try:
            os.eventfd_read(self.rep_fd)
        except BlockingIOError:
            return
        except OSError as e:
            self._unwatch(self.rep_fd)
            self.fail(f"reply eventfd: {e}", "died")
            return
        self._wake()

    def _readable(self) -> None:
        """The Unix socket: a DRAIN (read a header's bytes at a time), or the peer's end closing."""
        try:
            n = self.sock.recv_into(memoryview(self._control)[self._control_got:])
        except BlockingIOError:
            return
        except OSError as e:
            n, why = 0, str(e)
        else:
            why = "the shard replica closed the channel (stopped or died)"
        if n == 0:
            self._unwatch()
            self.fail(why, "died")
            return
        self._control_got += n
        if self._control_got < HEADER_BYTES:
            return
        self._control_got = 0
        try:
            kind = Header.unpack(memoryview(self._control)).kind
        except FrameError as e:
            kind, why = None, str(e)
        if kind == Kind.DRAIN:
            self.draining = True
        else:
            self._unwatch()
            self.fail(f"bad control frame from the shard: {why if kind is None else Kind(kind).name}",
                      "refused")

    def _not_waiting(self) -> None:
        _waiting.discard(self)

    def _spin(self) -> None:
        assert self._loop is not None
        spin_replies(self._loop)

    def close(self) -> None:
        if self._closed:
            return
        self._unwatch(self.rep_fd)
        super().close()
        for fd in (self.req_fd, self.rep_fd):
            os.close(fd)
        del self.req, self.rep
        try:
            self.mm.close()
        except BufferError:
            pass  # a view is still referenced somewhere; the mapping goes with it


_waiting: set[SharedChannel] = set()  # calls awaiting their answer (all loops; a spin polls its own loop's)


def spin_replies(loop: asyncio.AbstractEventLoop) -> None:
    """Poll the reply eventfd of every shared-memory call waiting on `loop` (a layer's calls, and a
    concurrent micro-batch's), and report each one answered, until all are or the budget is spent: twice
    the slowest recent round trip, within [SPIN_MIN_S, SPIN_MAX_S]; nothing when that is longer than
    SPIN_MAX_S (a shard that computes for milliseconds is not spun for)."""
    waiting = [c for c in _waiting if c._loop is loop]
    if not waiting:
        return
    expect = max(c.round_trip_s for c in waiting)
    if expect > SPIN_MAX_S:
        return
    end = time.perf_counter() + min(max(2 * expect, SPIN_MIN_S), SPIN_MAX_S)
    while waiting:
        waiting = [c for c in waiting if not c._poll()]
        if time.perf_counter() > end:
            return
