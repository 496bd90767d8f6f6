"""Faults on the data plane cost a pause, never an error (issue 20), on the dispatcher's side:
`DataPlane` and `ShardedExperts` against real shard endpoints (in this process, or a stopped
subprocess), with faults injected: a hung replica, refused frames, a TCP peer gone mid-send, a
sibling call that fails, stale registrations, and no file descriptor left on any refusal path.

The directory is an in-memory stand-in for Ray's GCS key-value store (`MemoryDirectory`); everything
else is the product's own code. Deadlines are short here (`hung_after_s`, the probe's timeout) so
that the faults show quickly; every wait is on an event or a condition, with a generous limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import moray.actors.dataplane.endpoint as endpoint_module
import moray.actors.dataplane.table as dataplane_module
from moray.actors.dataplane.channel import Channel, ChannelSpec, Endpoint, PeerGoneError
from moray.actors.dataplane.directory import Directory, Heartbeat
from moray.actors.dataplane.endpoint import TOKEN_BYTES, ShardEndpoint, recv_exact
from moray.actors.dataplane.frames import HEADER_BYTES, FrameBuffer, Header, Kind, Limits, RemoteError
from moray.actors.dataplane.shm import SharedChannel
from moray.actors.dataplane.table import DataPlane, open_channel
from moray.actors.experts import ExpertShard
from moray.actors.placement import Placement
from moray.actors.sharded import ShardedExperts, ShardUnavailableError

HUNG_S = 1.0  # the tests' floor for "hung" (the product's default is HUNG_AFTER_S)
WAIT_S = 30.0  # the most any condition here is waited for


class MemoryDirectory(Directory):
    """Ray's GCS key-value store as a dict (what `Directory` reads and writes there)."""

    def __init__(self) -> None:
        super().__init__("test")
        self.kv: dict[tuple[int, str], dict[str, Any]] = {}
        self.lock = threading.Lock()

    def announce(self, shard: int, replica: str, endpoint: dict[str, Any]) -> None:
        with self.lock:
            self.kv[(shard, replica)] = {**endpoint, "shard": shard, "replica": replica}

    def retract(self, shard: int, replica: str) -> None:
        with self.lock:
            self.kv.pop((shard, replica), None)

    def forget(self, shard: int, replica: str, beat: object) -> None:
        with self.lock:
            if self.kv.get((shard, replica), {}).get("beat") == beat:
                del self.kv[(shard, replica)]

    def clear(self) -> None:
        with self.lock:
            self.kv.clear()

    def endpoints(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(v) for v in self.kv.values()]


class Gate:
    """A shard's handler that can be made to hang (a stalled GPU): calls wait while the gate is shut."""

    def __init__(self, serve: Callable[..., torch.Tensor]) -> None:
        self.serve, self.is_open, self.held = serve, threading.Event(), threading.Event()
        self.is_open.set()

    def __call__(self, *args: Any) -> torch.Tensor:
        if not self.is_open.is_set():
            self.held.set()
            self.is_open.wait()
        return self.serve(*args)


@pytest.fixture(scope="module")
def shards(tiny_dir: Path) -> list[ExpertShard]:
    """Two replicas of one shard holding every expert (so either can answer any row)."""
    shard = ExpertShard(str(tiny_dir), 0, {})
    every = {layer: list(range(shard.cfg.n_experts)) for layer in range(shard.cfg.n_layers)}
    return [ExpertShard(str(tiny_dir), 0, every) for _ in range(2)]


@contextmanager
def replicas(shards: Sequence[ExpertShard], directory: Directory,
             handlers: Sequence[Callable[..., torch.Tensor]] | None = None) -> Iterator[list[ShardEndpoint]]:
    """A data-plane endpoint per shard replica, announced with a heartbeat, as `ExpertShard` does."""
    cfg = shards[0].cfg
    made: list[tuple[ShardEndpoint, Heartbeat]] = []
    try:
        for i, shard in enumerate(shards):
            ep = ShardEndpoint(handlers[i] if handlers else shard.serve,
                               Limits(0, cfg.dim, torch.float32, cfg.n_layers))
            beat = Heartbeat(directory, 0, f"r{i}", {**ep.address(), "node": None}, interval_s=0.05)
            made.append((ep, beat))
        yield [ep for ep, _ in made]
    finally:
        for ep, beat in made:
            beat.stop()
            ep.close()


def sharded(shards: Sequence[ExpertShard], directory: Directory, transport: str = "auto",
            shard_timeout_s: float = WAIT_S) -> tuple[DataPlane, ShardedExperts]:
    cfg = shards[0].cfg
    plane = DataPlane(directory, ChannelSpec(64, cfg.dim, torch.float32), 1, node=None,
                      transport=transport)  # type: ignore[arg-type]
    placement = Placement.round_robin(cfg.n_layers, cfg.n_experts, 1)
    return plane, ShardedExperts(placement, plane, shard_timeout_s, hung_after_s=HUNG_S)


def batch(shard: ExpertShard, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, shard.cfg.dim, generator=g)  # [T, D]
    ids = torch.stack([torch.randperm(shard.cfg.n_experts, generator=g)[:2] for _ in range(rows)])  # [T, A]
    gates = torch.softmax(torch.randn(rows, 2, generator=g), -1)  # [T, A]
    return x, ids, gates


async def step_equals_oracle(experts: ShardedExperts, shard: ExpertShard, layer: int, seed: int) -> None:
    """One layer of 16 rows (two chunks, one per usable replica) equals the experts computed here."""
    x, ids, gates = batch(shard, 16, seed)
    torch.testing.assert_close(await experts(layer, x, ids, gates), shard.banks[layer](x, ids, gates))


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT_S:g} s: {what}"
        await asyncio.sleep(0.01)


async def both_in_use(plane: DataPlane, experts: ShardedExperts, shard: ExpertShard) -> None:
    """Run steps (new channels join between steps) until both replicas have a usable channel."""
    deadline = time.monotonic() + WAIT_S
    seed = 0
    while len(plane.links(0)) < 2:
        assert time.monotonic() < deadline, f"replicas in use: {[c.endpoint.replica for c in plane.links(0)]}"
        seed += 1
        await step_equals_oracle(experts, shard, 0, seed)
        await asyncio.sleep(0.01)


def channel_to(plane: DataPlane, replica: str) -> Channel:
    (c,) = [c for c in plane.table[0] if c.endpoint.replica == replica]
    return c


def open_fds() -> set[tuple[str, str]]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except FileNotFoundError:  # the listing's own descriptor
            pass
    return found


def wait_disconnected(*eps: ShardEndpoint) -> None:
    deadline = time.monotonic() + WAIT_S
    while any(ep.connected() for ep in eps):
        assert time.monotonic() < deadline, "the endpoint kept a channel open"
        time.sleep(0.01)


@asynccontextmanager
async def closing(plane: DataPlane) -> AsyncIterator[DataPlane]:
    try:
        yield plane
    finally:
        plane.close()


# ---- a hung replica -----------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["auto", "socket"], ids=["shm", "tcp"])
def test_a_hung_replica_costs_one_deadline_then_is_left_out_until_it_answers_a_probe(
        shards: list[ExpertShard], transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataplane_module, "PROBE_TIMEOUT_S", 2 * HUNG_S)
    directory = MemoryDirectory()
    gates = [Gate(s.serve) for s in shards]
    with replicas(shards, directory, gates):
        async def run() -> float:
            plane, experts = sharded(shards, directory, transport)
            async with closing(plane):
                await both_in_use(plane, experts, shards[0])
                gates[0].is_open.clear()  # replica r0 hangs from its next call on
                start = time.perf_counter()
                await step_equals_oracle(experts, shards[0], 1, seed=100)  # its rows answered by r1
                paused = time.perf_counter() - start
                assert gates[0].held.is_set() and experts.faults.get((0, "hung"), 0) >= 1
                assert channel_to(plane, "r0").fault == "hung"
                for seed in range(101, 104):  # r0 is out of use: its hung call is not waited for again
                    await step_equals_oracle(experts, shards[0], seed % 4, seed)
                assert [c.endpoint.replica for c in plane.links(0)] == ["r1"]
                # dialled again after its back-off: the new channel's probe is not answered either (within
                # PROBE_TIMEOUT_S), so it stays out of use
                await until(lambda: "r0" in plane._failing and plane._failing["r0"].failures >= 2,
                            "a second failed try at r0")
                assert [c.endpoint.replica for c in plane.links(0)] == ["r1"]
                gates[0].is_open.set()  # it answers again: the next probe lets it back in
                await both_in_use(plane, experts, shards[0])
                return paused

        paused = asyncio.run(run())
    print(f"\nhung replica ({transport}): the step paused {paused * 1e3:.0f} ms (floor {HUNG_S} s)")


SERVER = """
import json, sys, time, torch
from moray.actors.dataplane.endpoint import ShardEndpoint
from moray.actors.dataplane.frames import Limits
ep = ShardEndpoint(lambda layer, x, ids, gates, tags: x, Limits(0, 64, torch.float32, 4))
print(json.dumps(ep.address()), flush=True)
time.sleep(600)
"""


def stop(pid: int) -> None:
    """SIGSTOP `pid` and wait until every one of its threads is stopped (the signal is asynchronous)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + WAIT_S
    while True:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(state in ("T", "t") for state in states):
            return
        assert time.monotonic() < deadline, f"{pid} not stopped: {states}"
        time.sleep(0.001)


@pytest.mark.parametrize("shared", [True, False], ids=["shm", "tcp"])
def test_a_stopped_process_is_hung_at_the_calls_deadline(shared: bool) -> None:
    """SIGSTOP: alive, sockets open, no answer. The call fails at its deadline with a hung fault."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        address = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        endpoint = Endpoint.from_dict({**address, "shard": 0, "replica": "stopped", "node": None})

        async def run() -> None:
            channel = open_channel(endpoint, ChannelSpec(8, 64, torch.float32), shared)
            channel.attach(asyncio.get_running_loop())
            x = torch.randn(2, 64)
            out = torch.zeros_like(x)
            await channel.call(0, x, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), (), out, None)
            torch.testing.assert_close(out, x)
            stop(proc.pid)
            with pytest.raises(PeerGoneError, match="no answer by the call's deadline") as caught:
                await channel.call(0, x, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), (), out, None,
                                   deadline=time.perf_counter() + HUNG_S)
            assert caught.value.kind == "hung" and channel.fault == "hung" and not channel.usable
            with pytest.raises(PeerGoneError):  # never reused
                await channel.call(0, x, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), (), out, None)
            channel.close()

        asyncio.run(run())
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


# ---- refused frames -----------------------------------------------------------------------------------
def inject(channel: Channel, fault: str) -> None:
    """Make the channel's next frame one the shard refuses."""
    if fault == "sequence":
        channel.seq += 5
        return
    write = channel._write

    def bad_write(seq: int, layer: int, x: torch.Tensor, *rest: Any) -> int:
        if fault == "dtype":
            return write(seq, layer, x.to(torch.bfloat16), *rest)
        n = write(seq, layer, x, *rest)  # oversized: more rows than the channel's HELLO agreed on
        buf = channel.req if isinstance(channel, SharedChannel) else channel.out  # type: ignore[attr-defined]
        Header.unpack(buf.buf)._replace(rows=channel.spec.max_rows + 1).pack_into(buf.buf)
        return n

    channel._write = bad_write  # type: ignore[method-assign]


@pytest.mark.parametrize("transport", ["auto", "socket"], ids=["shm", "tcp"])
@pytest.mark.parametrize("fault, message", [("sequence", "out of sequence"), ("dtype", "frame dtypes"),
                                            ("oversized", "oversized frame")])
def test_a_refused_frame_is_retried_on_a_sibling_and_the_channel_replaced(
        shards: list[ExpertShard], transport: str, fault: str, message: str,
        caplog: pytest.LogCaptureFixture) -> None:
    fds = open_fds()
    directory = MemoryDirectory()
    with replicas(shards, directory) as eps:
        async def run() -> float:
            plane, experts = sharded(shards, directory, transport)
            async with closing(plane):
                await both_in_use(plane, experts, shards[0])
                inject(channel_to(plane, "r0"), fault)
                start = time.perf_counter()
                await step_equals_oracle(experts, shards[0], 2, seed=7)  # no error: r1 answered r0's rows
                retried = time.perf_counter() - start
                assert experts.faults == {(0, "refused"): 1}
                assert channel_to(plane, "r0").fault == "refused"
                await step_equals_oracle(experts, shards[0], 3, seed=8)  # the next step succeeds
                await both_in_use(plane, experts, shards[0])  # and r0 is back on a new channel
                return retried

        retried = asyncio.run(run())
        assert message in caplog.text
        wait_disconnected(*eps)
    assert open_fds() - fds == set()  # both sides' descriptors (this process holds both ends)
    print(f"\nrefused frame ({fault}, {transport}): retried and answered in {retried * 1e3:.1f} ms")


# ---- a TCP peer gone mid-send -------------------------------------------------------------------------
class VanishingPeer:
    """A TCP shard replica that answers its channel's first frame (the probe), then resets the connection
    after the first bytes of the next one, while the dispatcher is still sending it."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.server = socket.create_server(("127.0.0.1", 0))
        self.token = os.urandom(TOKEN_BYTES)
        self.reset = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def address(self) -> dict[str, Any]:
        return {"unix": "moray-none", "host": "127.0.0.1", "port": self.server.getsockname()[1],
                "token": self.token.hex(), "pid": os.getpid(), "node": "elsewhere"}

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        hello = bytearray(HEADER_BYTES + TOKEN_BYTES)
        recv_exact(conn, memoryview(hello))
        rows = Header.unpack(memoryview(hello)).rows
        buf = FrameBuffer(memoryview(bytearray(HEADER_BYTES + rows * self.dim * 4 + (1 << 20))))
        buf.write_message(Kind.WELCOME, 0)
        conn.sendall(buf.buf[:HEADER_BYTES])
        head = bytearray(HEADER_BYTES)
        recv_exact(conn, memoryview(head))  # the probe: one row
        h = Header.unpack(memoryview(head))
        recv_exact(conn, memoryview(bytearray(h.payload)))
        n = buf.write_reply(h.seq, h.layer, torch.zeros(h.rows, self.dim))
        conn.sendall(buf.buf[:n])
        recv_exact(conn, memoryview(head))  # the next frame's header; its rows are still on the way
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # RST: the dispatcher's send fails with ECONNRESET / EPIPE
        self.reset.set()

    def close(self) -> None:
        self.server.close()


def test_a_tcp_peer_reset_mid_send_is_retried(shards: list[ExpertShard]) -> None:
    """A frame of 4096 rows cannot be sent at once, so the reset lands mid-send: the call is retried on
    the sibling replica, with the right answer, and the failure is a died fault, not a 500."""
    dim = 1024
    directory = MemoryDirectory()
    peer = VanishingPeer(dim)
    good = ShardEndpoint(lambda layer, x, ids, gates, tags: 2 * x, Limits(0, dim, torch.float32, 1))
    errors: list[dict[str, Any]] = []
    try:
        directory.announce(0, "vanishing", {**peer.address(), "beat": 1})
        beat = Heartbeat(directory, 0, "good", {**good.address(), "node": "elsewhere"}, interval_s=0.05)

        async def run() -> None:
            asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
            plane = DataPlane(directory, ChannelSpec(4096, dim, torch.float32), 1, node="here")
            experts = ShardedExperts(Placement.round_robin(1, 2, 1), plane, WAIT_S, hung_after_s=WAIT_S)
            async with closing(plane):
                plane.start()
                await until(lambda: len(plane.pending) == 2, "channels to both replicas")
                x = torch.randn(4096, dim)
                ids = torch.zeros(4096, 2, dtype=torch.long)
                plane.between_steps()  # both channels join the table
                plane.table[0].sort(key=lambda c: c.endpoint.replica != "vanishing")  # its turn first
                experts.min_split_rows = 1 << 20  # the rows go in one chunk, to the first channel
                vanishing = channel_to(plane, "vanishing")
                y = await experts(0, x, ids, torch.ones(4096, 2))
                torch.testing.assert_close(y, 2 * x)
                assert peer.reset.is_set() and experts.faults == {(0, "died"): 1}
                assert vanishing.fault == "died"

        asyncio.run(run())
        beat.stop()
    finally:
        peer.close()
        good.close()
    assert not [e for e in errors if "never retrieved" in str(e.get("message"))], errors


# ---- a sibling call fails for good --------------------------------------------------------------------
class FakeLinks:
    """Two shards: shard 0's call raises at once (an error of the shard's own code, not retryable),
    shard 1's waits until it is cancelled, noting whether the layer was still in flight then."""

    max_rows = 1 << 20

    def __init__(self, experts: list[ShardedExperts]) -> None:
        self.experts = experts
        self.cancelled_in_flight: list[int] = []
        self.started = asyncio.Event()

    def links(self, shard: int) -> list[FakeLinks]:
        return [self]

    async def pick(self, shard: int, deadline: float, attempt: int) -> None:
        return None

    def between_steps(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}

    def expected_s(self, rows: int) -> float:
        return 0.001

    async def call(self, layer: int, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor,
                   tags: Sequence[str], out: torch.Tensor, rows: torch.Tensor | None, spin: bool = False,
                   deadline: float = 0.0) -> None:
        if bool((ids[ids >= 0] % 2 == 0).all()):  # shard 0's experts (round robin over 2 shards)
            await self.started.wait()
            raise RemoteError("ValueError: the shard's own bug")
        self.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled_in_flight.append(self.experts[0].in_flight)
            raise


def test_a_failed_call_cancels_its_siblings_and_the_layer_stays_in_flight_until_they_return() -> None:
    async def run() -> None:
        holder: list[ShardedExperts] = []
        links = FakeLinks(holder)
        experts = ShardedExperts(Placement.round_robin(1, 4, 2), links)  # type: ignore[arg-type]
        holder.append(experts)
        x, ids = torch.randn(2, 8), torch.tensor([[0, 1], [2, 3]])
        with pytest.raises(RemoteError, match="own bug"):
            await asyncio.wait_for(experts(0, x, ids, torch.ones(2, 2)), WAIT_S)
        assert links.cancelled_in_flight == [1] and experts.in_flight == 0
        assert experts.faults == {}  # not a replica fault: not retried, not counted

    asyncio.run(run())


def test_no_replica_within_the_budget_is_shard_unavailable(shards: list[ExpertShard]) -> None:
    async def run() -> None:
        plane, experts = sharded(shards, MemoryDirectory(), shard_timeout_s=0.2)
        async with closing(plane):
            with pytest.raises(ShardUnavailableError, match="no replica of expert shard 0 answered within"):
                await step_equals_oracle(experts, shards[0], 0, seed=1)

    asyncio.run(run())


# ---- registrations belong to their replica ------------------------------------------------------------
def test_stale_registrations_are_not_dialled_and_live_ones_are_never_removed(
        shards: list[ExpertShard], monkeypatch: pytest.MonkeyPatch) -> None:
    """A key whose beat stopped is not dialled after STALE_S and deleted after FORGET_S; a replica whose
    heartbeat moves keeps its key, even one every connection to which is refused (wrong dim)."""
    monkeypatch.setattr(dataplane_module, "STALE_S", 0.3)
    monkeypatch.setattr(dataplane_module, "FORGET_S", 0.6)
    monkeypatch.setattr(dataplane_module, "DISCOVER_S", 0.05)
    directory = MemoryDirectory()
    cfg = shards[0].cfg
    refusing = ShardEndpoint(shards[0].serve, Limits(0, cfg.dim * 2, torch.float32, cfg.n_layers))
    beat = Heartbeat(directory, 0, "refusing", {**refusing.address(), "node": None}, interval_s=0.05)
    directory.announce(0, "killed", {**refusing.address(), "unix": "moray-gone", "node": None, "beat": 7})
    try:
        async def run() -> None:
            plane, _ = sharded(shards, directory)
            async with closing(plane):
                plane.start()
                await until(lambda: (0, "killed") not in directory.kv, "the killed replica's key deleted")
                tries = plane._failing["killed"].failures
                await asyncio.sleep(0.5)
                assert plane._failing["killed"].failures == tries  # stale: not dialled any more
                assert (0, "refusing") in directory.kv and plane._failing["refusing"].failures >= 2
                assert plane.links(0) == [] and plane.pending == []

        asyncio.run(run())
    finally:
        beat.stop()
        refusing.close()
    assert directory.kv == {}  # the owner retracts its own key when it stops


def test_heartbeat_puts_a_forgotten_key_back() -> None:
    directory = MemoryDirectory()
    beat = Heartbeat(directory, 1, "paused", {"host": "h"}, interval_s=0.02)
    try:
        first = directory.kv[(1, "paused")]["beat"]
        directory.forget(1, "paused", directory.kv[(1, "paused")]["beat"])
        deadline = time.monotonic() + WAIT_S
        while (1, "paused") not in directory.kv:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert directory.kv[(1, "paused")]["beat"] > first
    finally:
        beat.stop()
    assert directory.kv == {}


# ---- file descriptors and bounded waits ---------------------------------------------------------------
def endpoint_of(ep: ShardEndpoint, replica: str = "r") -> Endpoint:
    return Endpoint.from_dict({**ep.address(), "shard": 0, "replica": replica, "node": None})


def test_no_descriptor_is_left_on_a_refused_channel(shards: list[ExpertShard]) -> None:
    """Refused HELLOs over shared memory and TCP (wrong token, wrong dim, a segment of the wrong size,
    a HELLO cut short), then a channel closed twice: no descriptor of either side stays open."""
    cfg = shards[0].cfg
    ep = ShardEndpoint(shards[0].serve, Limits(0, cfg.dim, torch.float32, cfg.n_layers))
    spec = ChannelSpec(8, cfg.dim, torch.float32)
    try:
        fds = open_fds()
        wrong = Endpoint.from_dict({**ep.address(), "token": "00" * TOKEN_BYTES, "shard": 0, "replica": "r",
                                    "node": None})
        for shared in (True, False):
            with pytest.raises(RemoteError, match="wrong token"):
                open_channel(wrong, spec, shared)
            with pytest.raises(RemoteError, match="channel of dim"):
                open_channel(endpoint_of(ep), ChannelSpec(8, cfg.dim + 1, torch.float32), shared)
        memfd = os.memfd_create("wrong-size")
        events = [os.eventfd(0) for _ in range(2)]
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect("\0" + ep.unix_name)
            socket.send_fds(sock, [bytes(spec.hello(ep.token.hex()))], [memfd, *events])
            head = bytearray(HEADER_BYTES + 512)
            sock.recv_into(head)
            assert Header.unpack(memoryview(head)).kind == Kind.REFUSED and b"shared segment" in head
        for fd in (memfd, *events):
            os.close(fd)
        with socket.socket(socket.AF_UNIX) as sock:  # three descriptors, then gone before the HELLO's end
            sock.connect("\0" + ep.unix_name)
            short = [os.eventfd(0) for _ in range(3)]
            socket.send_fds(sock, [bytes(spec.hello(ep.token.hex()))[:10]], short)
            for fd in short:
                os.close(fd)
            sock.shutdown(socket.SHUT_WR)
            # Until the endpoint closes its end it may not have taken the connection yet: one still in the
            # listener's backlog counts in neither `connected()` nor our descriptors until it is accepted.
            assert sock.recv(1) == b""
        wait_disconnected(ep)
        assert open_fds() - fds == set()

        async def twice() -> None:
            channel = open_channel(endpoint_of(ep), spec, True)
            channel.attach(asyncio.get_running_loop())
            channel.close()
            reused = os.open(os.devnull, os.O_RDONLY)  # may take a number the channel held
            channel.close()  # idempotent: closes nothing of anyone else's
            os.fstat(reused)
            os.close(reused)

        asyncio.run(twice())
        wait_disconnected(ep)
        assert open_fds() - fds == set()
    finally:
        ep.close()


class SlowWelcome:
    """A replica that takes its time to answer HELLO (discovery may be cancelled meanwhile)."""

    def __init__(self, ep: ShardEndpoint, delay_s: float) -> None:
        self.ep, self.delay_s = ep, delay_s
        self.server = socket.socket(socket.AF_UNIX)
        self.name = f"moray-slow-{os.getpid()}-{id(self)}"
        self.server.bind("\0" + self.name)
        self.server.listen(1)
        self.accepted = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        data, fds, _, _ = socket.recv_fds(conn, HEADER_BYTES + TOKEN_BYTES, 3)
        self.accepted.set()
        time.sleep(self.delay_s)
        buf = FrameBuffer(memoryview(bytearray(HEADER_BYTES)))
        buf.write_message(Kind.WELCOME, 0)
        conn.sendall(buf.buf)
        conn.recv(1)  # until the dispatcher closes the channel
        for fd in fds:
            os.close(fd)
        conn.close()
        self.server.close()


def test_a_channel_opened_after_discovery_was_cancelled_is_closed(shards: list[ExpertShard]) -> None:
    cfg = shards[0].cfg
    ep = ShardEndpoint(shards[0].serve, Limits(0, cfg.dim, torch.float32, cfg.n_layers))
    try:
        fds = open_fds()
        slow = SlowWelcome(ep, delay_s=0.3)

        async def run() -> None:
            plane = DataPlane(MemoryDirectory(), ChannelSpec(8, cfg.dim, torch.float32), 1, node=None)
            endpoint = Endpoint.from_dict({**ep.address(), "unix": slow.name, "shard": 0, "replica": "slow",
                                           "node": None})
            opening = asyncio.ensure_future(plane._open(endpoint, True))
            await until(slow.accepted.is_set, "the HELLO reached the replica")
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            plane.close()

        asyncio.run(run())
        deadline = time.monotonic() + WAIT_S
        while open_fds() - fds:  # the thread finishes its connect, then the channel is closed
            assert time.monotonic() < deadline, open_fds() ^ fds
            time.sleep(0.01)
    finally:
        ep.close()


def test_a_silent_connection_is_dropped_at_the_hello_deadline_and_drain_is_bounded(
        shards: list[ExpertShard], monkeypatch: pytest.MonkeyPatch) -> None:
    """A TCP connection that never says HELLO holds no thread past HELLO_TIMEOUT_S; a dispatcher that
    stopped reading (our replies pile up) does not hold `drain()` past its bound."""
    monkeypatch.setattr(endpoint_module, "HELLO_TIMEOUT_S", 0.2)
    cfg = shards[0].cfg
    ep = ShardEndpoint(shards[0].serve, Limits(0, cfg.dim, torch.float32, cfg.n_layers))
    try:
        silent = socket.create_connection((ep.host, ep.port), timeout=WAIT_S)
        wait_disconnected(ep)  # dropped at the HELLO deadline
        assert silent.recv(1) == b""
        silent.close()
        spec = ChannelSpec(64, cfg.dim, torch.float32)
        stalled = socket.create_connection((ep.host, ep.port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(spec.hello(ep.token.hex()))
        frame = FrameBuffer(memoryview(bytearray(spec.capacity)))
        x, ids, gates = batch(shards[0], 64, seed=3)
        stalled.settimeout(0.05)
        try:
            for seq in range(1, 10_000):  # requests whose replies we never read, until the shard blocks
                stalled.sendall(frame.buf[:frame.write_request(seq, 0, x, ids, gates)])
        except (TimeoutError, BlockingIOError):
            pass
        start = time.monotonic()
        left = ep.drain(timeout_s=0.5)
        assert left == 1 and time.monotonic() - start < 5.0  # bounded, though a DRAIN could not be sent
        stalled.close()
        wait_disconnected(ep)
    finally:
        ep.close()


def test_a_control_header_read_in_pieces_is_a_drain_not_an_error(shards: list[ExpertShard]) -> None:
    cfg = shards[0].cfg
    ep = ShardEndpoint(shards[0].serve, Limits(0, cfg.dim, torch.float32, cfg.n_layers))
    errors: list[dict[str, Any]] = []
    try:
        async def run() -> None:
            asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
            channel = open_channel(endpoint_of(ep), ChannelSpec(8, cfg.dim, torch.float32), True)
            channel.attach(asyncio.get_running_loop())
            (session,) = ep._sessions.values()
            drain = FrameBuffer(memoryview(bytearray(HEADER_BYTES)))
            drain.write_message(Kind.DRAIN, 0)
            session.conn.sendall(drain.buf[:10])
            await asyncio.sleep(0.05)  # the loop reads the first piece
            assert channel.usable
            session.conn.sendall(drain.buf[10:])
            await until(lambda: channel.draining, "the DRAIN read whole")
            assert channel.dead is None
            channel.close()

        asyncio.run(run())
    finally:
        ep.close()
    assert errors == []


# ---- two micro-batches on the same channels ------------------------------------------------------------
def test_two_layers_in_flight_take_turns_on_a_channel_and_each_gets_its_own_answer(
        shards: list[ExpertShard]) -> None:
    """Ping-pong: the engine's two halves each have a layer out at once, through one replica. The first
    layer's frame holds the channel; the second waits its turn (no frame overwritten, no answer taken by
    the wrong layer), and both equal the experts computed here."""
    directory = MemoryDirectory()
    with replicas(shards[:1], directory):
        async def run() -> None:
            plane, experts = sharded(shards[:1], directory)
            async with closing(plane):
                await step_equals_oracle(experts, shards[0], 0, seed=1)  # the channel is open and in use
                (channel,) = plane.links(0)
                before = channel.calls
                halves = [batch(shards[0], rows, seed) for rows, seed in ((3, 2), (5, 3))]
                ys = await asyncio.wait_for(asyncio.gather(*(experts(1, *half) for half in halves)), WAIT_S)
                for (x, ids, gates), y in zip(halves, ys, strict=True):
                    torch.testing.assert_close(y, shards[0].banks[1](x, ids, gates))
                assert channel.calls == before + 2 and experts.in_flight == 0 and experts.faults == {}

        asyncio.run(run())
