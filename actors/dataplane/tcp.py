"""The TCP channel (a shard replica on another node, or `transport="socket"`).

The same frame as shared memory's, on a TCP stream: sent from a pre-allocated buffer (what the socket does
not take at once goes from the loop's writer callback) and read into another by the event loop's reader
callback. TCP keepalive and `TCP_USER_TIMEOUT` notice a vanished node or a half-open connection. The rest
of a channel's life (calls, deadlines, faults) is `Channel`'s (`actors/dataplane/channel.py`).
"""

from __future__ import annotations

import logging
import socket

import torch

from moray.actors.dataplane.channel import CONNECT_TIMEOUT_S, Channel, ChannelSpec, Endpoint, await_welcome
from moray.actors.dataplane.endpoint import set_keepalive
from moray.actors.dataplane.frames import HEADER_BYTES, FrameBuffer, FrameError, Header, Kind
from moray.actors.faults import FaultKind

log = logging.getLogger(__name__)


class SocketChannel(Channel):
    def __init__(self, endpoint: Endpoint, spec: ChannelSpec, sock: socket.socket) -> None:
        super().__init__(endpoint, spec, sock)
        self.outbound, self.inbound = bytearray(spec.capacity), bytearray(spec.capacity)
        self.out, self.inb = FrameBuffer(memoryview(self.outbound)), FrameBuffer(memoryview(self.inbound))
        self._view = memoryview(self.inbound)
        self._got, self._want = 0, HEADER_BYTES
        self._outgoing: memoryview | None = None  # what is left to send of the frame out
        self._writing = False  # the event loop's writer callback is set

    @classmethod
    def connect(cls, endpoint: Endpoint, spec: ChannelSpec) -> SocketChannel:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=CONNECT_TIMEOUT_S)
        try:
            set_keepalive(sock)
            sock.sendall(spec.hello(endpoint.token))
            await_welcome(sock, endpoint)
        except BaseException:
            sock.close()
            raise
        return cls(endpoint, spec, sock)

    def _write(self, seq: int, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
               tags: bytes, rows: torch.Tensor | None) -> int:
        return self.out.write_request(seq, layer, x, expert_ids, gates, tags, rows)

    def _signal(self, n: int) -> None:
        """Send what the socket takes now; the rest goes out from the event loop's writer callback."""
        self._outgoing = memoryview(self.outbound)[:n]
        self._writable()

    def _writable(self) -> None:
        assert self._loop is not None
        while self._outgoing is not None:
            try:
                sent = self.sock.send(self._outgoing)
            except BlockingIOError:
                if not self._writing:
                    self._loop.add_writer(self.sock.fileno(), self._writable)
                    self._writing = True
                return
            except OSError as e:
                self._stop_writing()
                return self._gone(f"{type(e).__name__}: {e}", "died")
            self._outgoing = self._outgoing[sent:] if sent < len(self._outgoing) else None
        self._stop_writing()

    def _stop_writing(self) -> None:
        self._outgoing = None
        if self._writing:
            self._writing = False
            if self._loop is not None and not self._loop.is_closed():
                try:
                    self._loop.remove_writer(self.sock.fileno())
                except (ValueError, OSError):
                    pass

    def _read_reply(self, rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        return self.inb.read_reply(self.seq, rows, dim, dtype)

    def _resume(self) -> None:
        self._stop_writing()  # a frame refused before it was all sent: the rest is not wanted
        self._got, self._want = 0, HEADER_BYTES
        if self.dead is None and self._loop is not None:
            self._loop.add_reader(self.sock.fileno(), self._readable)  # paused while the reply was read

    def _readable(self) -> None:
        """Read what has arrived; a whole REPLY/ERROR frame wakes the call, a DRAIN marks the channel."""
        while self._got < self._want:
            try:
                n = self.sock.recv_into(self._view[self._got:self._want])
            except BlockingIOError:
                return
            except OSError as e:
                return self._gone(str(e), "died")
            if n == 0:
                return self._gone("the shard replica closed the channel (stopped or died)", "died")
            self._got += n
            if self._got == HEADER_BYTES and self._want == HEADER_BYTES:
                if not self._header():
                    return
        self._frame_done()

    def _header(self) -> bool:
        try:
            h = Header.unpack(self._view)
        except FrameError as e:
            self._gone(f"bad frame from the shard: {e}", "refused")
            return False
        if h.payload > len(self._view) - HEADER_BYTES:
            self._gone(f"oversized frame from the shard: {h.payload} bytes", "refused")
            return False
        self._want = HEADER_BYTES + h.payload
        return True

    def _frame_done(self) -> None:
        assert self._loop is not None
        h = Header.unpack(self._view)
        if h.kind == Kind.DRAIN:
            self.draining = True
            self._got, self._want = 0, HEADER_BYTES
            return
        self._loop.remove_reader(self.sock.fileno())  # hold the frame until the call has read it
        if self._gather is None or self._reported:
            self._gone(f"unexpected {Kind(h.kind).name} frame from the shard", "refused")
            return
        self._wake()

    def _gone(self, why: str, kind: FaultKind) -> None:
        self._unwatch()
        self._stop_writing()
        self.fail(why, kind)

    def close(self) -> None:
        if not self._closed:
            self._stop_writing()
        super().close()
