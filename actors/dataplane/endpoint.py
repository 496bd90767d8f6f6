"""The shard's end of the data plane: where dispatchers open channels and send each layer's rows.

A `ShardEndpoint` listens on two sockets and serves every channel on a thread of its own:
- a Unix socket in Linux's abstract namespace (no file, nothing to clean up), for dispatchers on the
  same node: the dispatcher's HELLO carries three file descriptors (SCM_RIGHTS): a `memfd` holding
  the request and reply regions, and two eventfds that say "request written" / "reply written".
  The segment never has a name, so nothing lands in /dev/shm and it is freed when both ends close;
  the socket stays open as the liveness signal (a dead peer's end closes at once) and carries DRAIN;
- a TCP socket on the node's address, for dispatchers on other nodes: the same frames on the stream.

A channel opens with HELLO (the dispatcher's largest frame, dim, dtype and the endpoint's token,
which it learnt through the Ray control plane) and WELCOME, within `HELLO_TIMEOUT_S`. Requests are
then answered in order, each checked against what the channel agreed on (`FrameBuffer.read_request`):
a frame that breaks the agreement is answered REFUSED and the channel ends (the dispatcher retries the
rows on another replica and opens a new channel). `drain()` tells every dispatcher to stop sending and
waits for them to close their channels (a replica Serve stops). `check_health()` is what Serve's health
check calls: it fails while an expert call has been computing for longer than a hung GPU would.
"""

from __future__ import annotations

import hmac
import logging
import mmap
import os
import secrets
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moray.actors.dataplane.frames import (
    CODE_DTYPES,
    HEADER_BYTES,
    FrameBuffer,
    FrameError,
    Header,
    Kind,
    Limits,
    capacity,
)

log = logging.getLogger(__name__)

Handler = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, Sequence[str]], torch.Tensor]
MAX_CHANNEL_BYTES = 1 << 31  # largest frame a HELLO may ask for: refuses absurd sizes up front
TOKEN_BYTES = 16
HELLO_TIMEOUT_S = 5.0  # a connection that has not completed its HELLO by then is dropped
NOTIFY_TIMEOUT_S = 0.2  # a DRAIN that cannot be sent by then (a stalled reader) is skipped
USER_TIMEOUT_MS = 5000  # TCP_USER_TIMEOUT: sent data unacknowledged this long ends the connection


def set_keepalive(sock: socket.socket) -> None:
    """A TCP peer whose node vanished is noticed within ~4 s even while the channel is idle (keepalive),
    and within `USER_TIMEOUT_MS` while data we sent goes unacknowledged (a half-open connection)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 1), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3),
                        ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill `view` from a blocking socket; False if the peer closed first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


@dataclass
class _Session:
    conn: socket.socket
    peer: str
    send_lock: threading.Lock

    def send(self, data: bytes | bytearray | memoryview) -> None:
        with self.send_lock:
            self.conn.sendall(data)

    def notify(self, kind: Kind) -> bool:
        """Send a bare `kind` frame without blocking for long: False when it could not go out whole (the
        peer is gone, or its reader stalled with our frames unread)."""
        buf = FrameBuffer.bare(kind)
        if not self.send_lock.acquire(timeout=NOTIFY_TIMEOUT_S):
            return False
        try:
            return self.conn.send(buf, socket.MSG_DONTWAIT) == len(buf)
        except OSError:
            return False  # gone, or the socket's buffer is full
        finally:
            self.send_lock.release()


class ShardEndpoint:
    def __init__(self, handler: Handler, limits: Limits, *, host: str = "127.0.0.1") -> None:
        """`limits.max_rows` is ignored: each channel's HELLO sets its own (up to MAX_CHANNEL_BYTES)."""
        self.handler, self.limits = handler, limits
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.unix_name = f"moray-shard-{uuid.uuid4().hex}"
        self._unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._unix.bind("\0" + self.unix_name)
        self._tcp = socket.create_server((host, 0))
        self.host, self.port = host, self._tcp.getsockname()[1]
        self._sessions: dict[int, _Session] = {}
        self._lock = threading.Lock()  # sessions
        self._compute = threading.Lock()  # one handler call at a time
        self._computing_since: float | None = None  # when the handler call running now began
        self._accepting: list[threading.Thread] = []
        self.draining = self.closed = False
        for listener, name in ((self._unix, "unix"), (self._tcp, "tcp")):
            listener.listen(64)
            thread = threading.Thread(target=self._accept, args=(listener,), name=f"moray-{name}-accept",
                                      daemon=True)
            thread.start()
            self._accepting.append(thread)

    def address(self) -> dict[str, object]:
        return {"unix": self.unix_name, "host": self.host, "port": self.port, "token": self.token.hex(),
                "pid": os.getpid()}

    # ---- lifecycle ----------------------------------------------------------------------------
    def drain(self, timeout_s: float = 3.0) -> int:
        """Tell every connected dispatcher to stop sending here; wait until they closed their channels.
        Returns how many were still open at the deadline."""
        self.draining = True
        with self._lock:
            sessions = list(self._sessions.values())
        deadline = time.monotonic() + timeout_s
        for s in sessions:
            s.notify(Kind.DRAIN)
        while self._sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self._sessions)

    def close(self) -> None:
        self.closed = self.draining = True
        for listener in (self._unix, self._tcp):
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            try:
                s.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def connected(self) -> int:
        return len(self._sessions)

    def check_health(self, max_call_s: float) -> None:
        """Raise unless the endpoint takes channels and no expert call has been computing for longer
        than `max_call_s` (a hung GPU or kernel: the dispatchers time such a replica out; Serve replaces
        it when its health check fails)."""
        if self.closed:
            return  # stopping (drained): Serve is replacing this replica anyway
        if not all(t.is_alive() for t in self._accepting):
            raise RuntimeError("the data-plane endpoint stopped accepting channels")
        since = self._computing_since
        if since is not None and time.monotonic() - since > max_call_s:
            raise RuntimeError(f"an expert call has been computing for {time.monotonic() - since:.0f} s "
                               f"(more than {max_call_s:g} s): hung")

    # ---- accepting channels -------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while not self.closed:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn, listener is self._unix),
                             name="moray-channel", daemon=True).start()

    def _session(self, conn: socket.socket, local: bool) -> None:
        peer = "local" if local else str(conn.getpeername())
        session = _Session(conn, peer, threading.Lock())
        with self._lock:
            self._sessions[id(session)] = session
        try:
            if not local:
                set_keepalive(conn)
            conn.settimeout(HELLO_TIMEOUT_S)  # until the channel is open: a silent peer holds no thread
            self._run(session, local)
        except (OSError, FrameError) as e:
            log.warning("data-plane channel from %s closed: %s", peer, str(e))  # str: no frame kept alive
        finally:
            with self._lock:  # closed before it stops counting: `connected()` 0 means no descriptor left
                conn.close()
                self._sessions.pop(id(session), None)

    def _hello(self, conn: socket.socket, local: bool) -> tuple[Header, list[int]] | None:
        """Read a HELLO (with its fds on the Unix socket); None if the peer left or was refused (every fd
        it sent closed)."""
        buf = bytearray(HEADER_BYTES + TOKEN_BYTES)
        fds: list[int] = []
        try:
            if local:
                data, fds, _, _ = socket.recv_fds(conn, len(buf), 3)
                buf[:len(data)] = data
                if not data or (len(data) < len(buf) and not recv_exact(conn, memoryview(buf)[len(data):])):
                    raise EOFError
            elif not recv_exact(conn, memoryview(buf)):
                raise EOFError
            h = Header.unpack(memoryview(buf))
            problem = self._refusal(h, bytes(buf[HEADER_BYTES:]), local, len(fds))
        except EOFError:
            problem = ""
        except BaseException:
            _close_all(fds)
            raise
        if problem is None:
            return h, fds
        _close_all(fds)
        if problem:
            self._refuse(conn, problem)
        return None

    def _refusal(self, h: Header, token: bytes, local: bool, num_fds: int) -> str | None:
        if h.kind != Kind.HELLO:
            return f"expected HELLO, got {Kind(h.kind).name}"
        if not hmac.compare_digest(token, self.token):
            return "wrong token"
        if self.draining:
            return "this replica is draining"
        if h.dim != self.limits.dim or CODE_DTYPES.get(h.x_dtype) != self.limits.dtype:
            return (f"channel of dim {h.dim} dtype {CODE_DTYPES.get(h.x_dtype)}; this shard serves "
                    f"dim {self.limits.dim} {self.limits.dtype}")
        if not 0 < h.rows or capacity(h.rows, h.dim, self.limits.dtype, h.slots) > MAX_CHANNEL_BYTES:
            return f"oversized channel: {h.rows} rows of dim {h.dim}"
        if local and num_fds != 3:
            return f"a shared-memory HELLO carries 3 descriptors, got {num_fds}"
        return None

    def _refuse(self, conn: socket.socket, message: str) -> None:
        """Tell the peer why its HELLO or frame was refused (best effort: it may be gone)."""
        log.warning("data-plane channel refused: %s", message)
        buf = bytearray(HEADER_BYTES + 512)
        n = FrameBuffer(memoryview(buf)).write_message(Kind.REFUSED, 0, message)
        try:
            conn.settimeout(NOTIFY_TIMEOUT_S)
            conn.sendall(memoryview(buf)[:n])
        except OSError:
            pass

    def _run(self, session: _Session, local: bool) -> None:
        hello = self._hello(session.conn, local)
        if hello is None:
            return
        h, fds = hello
        limits = Limits(h.rows, h.dim, self.limits.dtype, self.limits.num_layers, h.slots)
        cap = capacity(h.rows, h.dim, self.limits.dtype, h.slots)
        if local:
            self._run_shared(session, limits, cap, fds)
        else:
            self._run_socket(session, limits, cap)

    def _welcome(self, session: _Session) -> None:
        session.send(FrameBuffer.bare(Kind.WELCOME))
        session.conn.settimeout(None)  # open: frames come when the dispatcher has rows, however idle
        log.info("data-plane channel open from %s", session.peer)

    # ---- serving -------------------------------------------------------------------------------
    def _answer(self, req: FrameBuffer, rep: FrameBuffer, expected: int, limits: Limits) -> tuple[int, bool]:
        """Answer the request in `req` into `rep`: (the reply's length, whether the channel goes on). A
        frame that breaks the agreement is answered REFUSED and ends the channel (it is out of step)."""
        try:
            r = req.read_request(expected, limits)
        except FrameError as e:
            log.warning("data-plane frame refused: %s", str(e))  # str: a record keeps no buffer alive
            return rep.write_message(Kind.REFUSED, expected, str(e)), False
        try:
            with self._compute:
                self._computing_since = time.monotonic()
                try:
                    y = self.handler(r.layer, r.x, r.expert_ids, r.gates, r.tags)
                finally:
                    self._computing_since = None
            return rep.write_reply(r.seq, r.layer, y), True
        except Exception as e:  # noqa: BLE001 - the shard's own error goes back to the dispatcher
            log.exception("expert call failed")
            return rep.write_message(Kind.ERROR, r.seq, f"{type(e).__name__}: {e}"), True

    def _run_shared(self, session: _Session, limits: Limits, cap: int, fds: list[int]) -> None:
        memfd, req_fd, rep_fd = fds
        try:
            size = os.fstat(memfd).st_size
            if size != 2 * cap:
                self._refuse(session.conn, f"shared segment of {size} bytes, the channel needs {2 * cap}")
                _close_all([req_fd, rep_fd])
                return
            mm = mmap.mmap(memfd, size)
        except BaseException:
            _close_all([req_fd, rep_fd])
            raise
        finally:
            os.close(memfd)
        try:
            self._welcome(session)
            self._serve_shared(session, mm, cap, req_fd, rep_fd, limits)
        finally:
            os.close(req_fd)
            os.close(rep_fd)
            try:
                mm.close()
            except BufferError:
                pass  # a view outlives us in a traceback; the mapping goes with it

    def _serve_shared(self, session: _Session, mm: mmap.mmap, cap: int, req_fd: int, rep_fd: int,
                      limits: Limits) -> None:
        view = memoryview(mm)
        req, rep = FrameBuffer(view[:cap]), FrameBuffer(view[cap:])
        poller = select.poll()
        poller.register(req_fd, select.POLLIN)
        poller.register(session.conn.fileno(), select.POLLIN)
        expected = 1
        try:
            while True:
                for fd, _ in poller.poll():
                    if fd == req_fd:
                        try:
                            os.eventfd_read(req_fd)
                        except BlockingIOError:
                            continue
                        _, going = self._answer(req, rep, expected, limits)
                        expected += 1
                        os.eventfd_write(rep_fd, 1)
                        if not going:  # refused: answer nothing more; the dispatcher closes the channel
                            poller.unregister(req_fd)
                    elif not session.conn.recv(HEADER_BYTES):  # the dispatcher closed the channel (or died)
                        return
        finally:
            del req, rep
            view.release()

    def _run_socket(self, session: _Session, limits: Limits, cap: int) -> None:
        inbound, outbound = bytearray(cap), bytearray(cap)
        req, rep = FrameBuffer(memoryview(inbound)), FrameBuffer(memoryview(outbound))
        view, out = memoryview(inbound), memoryview(outbound)
        self._welcome(session)
        expected, going = 1, True
        while going and recv_exact(session.conn, view[:HEADER_BYTES]):
            h = Header.unpack(view)
            if h.kind != Kind.REQUEST or h.payload > cap - HEADER_BYTES:
                problem = (f"expected a REQUEST frame, got {Kind(h.kind).name}" if h.kind != Kind.REQUEST
                           else f"oversized frame: payload {h.payload} bytes, the channel holds "
                                f"{cap - HEADER_BYTES}")
                self._refuse(session.conn, f"frame refused: {problem}")
                return  # the stream cannot be trusted past a frame we did not read
            if not recv_exact(session.conn, view[HEADER_BYTES:HEADER_BYTES + h.payload]):
                return
            n, going = self._answer(req, rep, expected, limits)
            expected += 1
            session.send(out[:n])


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
