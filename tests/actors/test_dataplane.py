"""The data plane without Ray: frames, a shard's endpoint and the dispatcher's channels (shared memory
and TCP), bad frames, a peer killed mid-call, draining, and nothing left in /dev/shm."""

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from moray.actors.dataplane.channel import Channel, ChannelSpec, Endpoint, PeerGoneError
from moray.actors.dataplane.endpoint import TOKEN_BYTES, ShardEndpoint, recv_exact
from moray.actors.dataplane.frames import (
    HEADER_BYTES,
    FrameBuffer,
    FrameError,
    Header,
    Kind,
    Limits,
    RemoteError,
    capacity,
)
from moray.actors.dataplane.table import open_channel
from moray.actors.experts import ExpertShard
from moray.model.config import MixtralConfig

D = 64
LIMITS = Limits(max_rows=8, dim=D, dtype=torch.float32, num_layers=4)


def request(rows: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, D, generator=g).to(dtype)
    ids = torch.randint(-1, 8, (rows, 2), generator=g)
    gates = torch.rand(rows, 2, generator=g).to(dtype)
    return x, ids, gates


def frame_buffer(rows: int = 8, dtype: torch.dtype = torch.float32) -> FrameBuffer:
    return FrameBuffer(memoryview(bytearray(capacity(rows, D, dtype))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_request_round_trip(dtype: torch.dtype) -> None:
    buf = frame_buffer(dtype=dtype)
    x, ids, gates = request(5, dtype)
    buf.write_request(1, 3, x, ids, gates, b"req-a\nreq-b")
    got = buf.read_request(1, Limits(8, D, dtype, 4))
    assert got.layer == 3 and got.tags == ("req-a", "req-b")
    assert torch.equal(got.x, x) and torch.equal(got.expert_ids, ids) and torch.equal(got.gates, gates)
    assert got.x.untyped_storage().data_ptr() == buf.u8.untyped_storage().data_ptr()  # a view, no copy


def corrupt(buf: FrameBuffer, **fields: int) -> None:
    h = Header.unpack(buf.buf)
    h._replace(**fields).pack_into(buf.buf)


@pytest.mark.parametrize("change, message", [
    ({"seq": 7}, "out of sequence: expected 1, got 7"),
    ({"rows": 9}, "oversized frame: 9 rows"),
    ({"payload": 100}, "truncated or padded frame"),
    ({"layer": 4}, "layer 4 out of range"),
    ({"x_dtype": 2}, "frame dtypes"),
    ({"kind": int(Kind.REPLY)}, "expected a REQUEST frame"),
])
def test_bad_request_frames_are_refused(change: dict[str, int], message: str) -> None:
    buf = frame_buffer()
    buf.write_request(1, 0, *request(4))
    corrupt(buf, **change)
    with pytest.raises(FrameError, match=message):
        buf.read_request(1, LIMITS)


def test_wrong_magic_and_oversized_writes_are_refused() -> None:
    buf = frame_buffer()
    buf.write_request(1, 0, *request(4))
    buf.buf[0:4] = b"XXXX"
    with pytest.raises(FrameError, match="not a moray frame"):
        buf.read_request(1, LIMITS)
    with pytest.raises(FrameError, match="oversized frame"):
        frame_buffer(rows=4).write_request(1, 0, *request(2000))  # the buffer holds 4 rows + tags


def test_reply_checks_sequence_and_shape() -> None:
    buf = frame_buffer()
    y = torch.randn(3, D)
    buf.write_reply(2, 0, y)
    assert torch.equal(buf.read_reply(2, 3, D, torch.float32), y)
    with pytest.raises(FrameError, match="out of sequence"):
        buf.read_reply(3, 3, D, torch.float32)
    with pytest.raises(FrameError, match="reply of 3x64"):
        buf.read_reply(2, 4, D, torch.float32)
    buf.write_message(Kind.ERROR, 2, "ValueError: boom")
    with pytest.raises(RemoteError, match="boom"):
        buf.read_reply(2, 3, D, torch.float32)


# ---- a real shard behind an endpoint, in this process ------------------------------------------------
@pytest.fixture(scope="module")
def shard(tiny_dir: Path) -> ExpertShard:
    cfg = MixtralConfig.load(tiny_dir)
    return ExpertShard(str(tiny_dir), 0, {layer: list(range(cfg.n_experts)) for layer in range(cfg.n_layers)})


@pytest.fixture()
def endpoint(shard: ExpertShard) -> Iterator[tuple[ShardEndpoint, Endpoint]]:
    limits = Limits(0, shard.cfg.dim, torch.float32, shard.cfg.n_layers)
    ep = ShardEndpoint(shard.serve, limits)
    yield ep, Endpoint.from_dict({**ep.address(), "shard": 0, "replica": "r0", "node": None})
    ep.close()


def spec(shard: ExpertShard, rows: int = 64) -> ChannelSpec:
    return ChannelSpec(max_rows=rows, dim=shard.cfg.dim, dtype=torch.float32)


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


async def call(channel: Channel, layer: int, x: torch.Tensor, ids: torch.Tensor,
               gates: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    await channel.call(layer, x, ids, gates, ("req-1",), out, torch.arange(len(x)))
    return out


@pytest.mark.parametrize("shared", [True, False], ids=["shm", "tcp"])
def test_channel_answers_equal_the_shard(shard: ExpertShard, endpoint: tuple[ShardEndpoint, Endpoint],
                                         shared: bool) -> None:
    before = shm_entries()
    cfg = shard.cfg

    async def run() -> None:
        channel = open_channel(endpoint[1], spec(shard), shared)
        channel.attach(asyncio.get_running_loop())
        for rows, layer in ((1, 0), (16, 1), (64, 3), (5, 2)):
            g = torch.Generator().manual_seed(rows)
            x = torch.randn(rows, cfg.dim, generator=g)
            ids = torch.stack([torch.randperm(cfg.n_experts, generator=g)[:2] for _ in range(rows)])
            gates = torch.rand(rows, 2, generator=g)
            served = shard.tokens_served[layer].clone()
            got = await call(channel, layer, x, ids, gates)
            assert torch.equal(got, shard.banks[layer](x, ids, gates))
            assert int((shard.tokens_served[layer] - served).sum()) == rows * 2  # counted for autoscaling
        assert channel.calls == 4 and channel.seq == 4
        assert shm_entries() == before  # an anonymous memfd: nothing named in /dev/shm
        channel.close()

    asyncio.run(run())
    deadline = time.monotonic() + 2
    while endpoint[0].connected() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert endpoint[0].connected() == 0


@pytest.mark.parametrize("shared", [True, False], ids=["shm", "tcp"])
def test_a_step_over_two_channels_gathers_its_rows_and_every_answer_arrives(shared: bool) -> None:
    """As the dispatcher sends a step: each channel gets some rows of the layer's x (gathered into the
    frame) and each answer lands at its rows. Over shared memory the last call polls for every reply of
    the step; the shards are fast (they scale their rows: no expert compute), so round trips stay under
    the polling budget and the poll is what answers: a reply it took but did not hand to its call would
    hang the step (a timeout here). Over TCP the event loop reads the replies."""
    dim, layers = 16, 4

    def scaled(factor: float) -> Callable[..., torch.Tensor]:
        return lambda layer, x, ids, gates, tags: x * factor + layer

    ends = [ShardEndpoint(scaled(f), Limits(0, dim, torch.float32, layers)) for f in (2.0, -3.0)]
    try:
        async def run() -> None:
            channels = [open_channel(Endpoint.from_dict({**e.address(), "shard": i, "replica": f"r{i}",
                                                         "node": None}),
                                     ChannelSpec(max_rows=16, dim=dim, dtype=torch.float32), shared)
                        for i, e in enumerate(ends)]
            for c in channels:
                c.attach(asyncio.get_running_loop())
            g = torch.Generator().manual_seed(3)
            for step in range(300):
                n, layer = 1 + step % 9, step % layers
                x = torch.randn(n, dim, generator=g)
                ids, gates = torch.zeros(n, 2, dtype=torch.long), torch.ones(n, 2)
                halves = [torch.arange(0, n, 2), torch.arange(1, n, 2)] if n > 1 else [None, None]
                out = torch.zeros_like(x)
                sizes = [n if r is None else len(r) for r in halves]
                calls = [c.call(layer, x, ids[:k], gates[:k], (), out, r, spin=i == 1)
                         for i, (c, r, k) in enumerate(zip(channels, halves, sizes, strict=True))]
                await asyncio.wait_for(asyncio.gather(*calls), 10)
                want = torch.zeros_like(x)
                for f, r in zip((2.0, -3.0), halves, strict=True):
                    want[slice(None) if r is None else r] += (x if r is None else x[r]) * f + layer
                torch.testing.assert_close(out, want)
            assert all(c.calls == 300 for c in channels)
            for c in channels:
                c.close()

        asyncio.run(run())
    finally:
        for e in ends:
            e.close()


def test_shard_refuses_experts_it_does_not_hold(tiny_dir: Path) -> None:
    shard = ExpertShard(str(tiny_dir), 1, {0: [2, 3]})
    ep = ShardEndpoint(shard.serve, Limits(0, shard.cfg.dim, torch.float32, shard.cfg.n_layers))
    try:
        async def run() -> None:
            channel = open_channel(Endpoint.from_dict({**ep.address(), "shard": 1, "replica": "r",
                                                       "node": None}), spec(shard), True)
            channel.attach(asyncio.get_running_loop())
            x = torch.randn(2, shard.cfg.dim)
            with pytest.raises(RemoteError, match="does not hold every expert"):
                await call(channel, 0, x, torch.tensor([[2, 5], [3, -1]]), torch.ones(2, 2))
            ok = await call(channel, 0, x, torch.tensor([[2, -1], [3, -1]]), torch.ones(2, 2))
            assert torch.equal(ok, shard.banks[0](x, torch.tensor([[2, -1], [3, -1]]), torch.ones(2, 2)))
            channel.close()

        asyncio.run(run())
    finally:
        ep.close()


def raw_tcp(ep: ShardEndpoint, chan: ChannelSpec, token: bytes | None = None) -> socket.socket:
    sock = socket.create_connection((ep.host, ep.port), timeout=5)
    hello = chan.hello((token or ep.token).hex())
    sock.sendall(hello)
    return sock


def read_frame(sock: socket.socket) -> tuple[Header, bytes]:
    head = bytearray(HEADER_BYTES)
    assert recv_exact(sock, memoryview(head)), "the endpoint closed the socket"
    h = Header.unpack(memoryview(head))
    body = bytearray(h.payload)
    assert recv_exact(sock, memoryview(body))
    return h, bytes(body)


def test_bad_frames_on_a_live_channel(shard: ExpertShard, endpoint: tuple[ShardEndpoint, Endpoint]) -> None:
    """A good frame is answered; a frame out of sequence or oversized is answered REFUSED and ends the
    channel (it is out of step: the dispatcher retries the rows elsewhere); a bad token is refused."""
    ep, chan = endpoint[0], spec(shard, rows=8)
    x, ids, gates = torch.randn(3, shard.cfg.dim), torch.tensor([[0, 1], [2, 3], [4, -1]]), torch.rand(3, 2)
    buf = FrameBuffer(memoryview(bytearray(chan.capacity)))
    sock = raw_tcp(ep, chan)
    assert read_frame(sock)[0].kind == Kind.WELCOME
    n = buf.write_request(1, 0, x, ids, gates)
    sock.sendall(buf.buf[:n])
    h, body = read_frame(sock)
    assert h.kind == Kind.REPLY and h.seq == 1
    y = torch.frombuffer(bytearray(body), dtype=torch.float32).view(3, -1)
    assert torch.equal(y, shard.banks[0](x, ids, gates))
    n = buf.write_request(5, 0, x, ids, gates)
    sock.sendall(buf.buf[:n])
    h, body = read_frame(sock)
    assert h.kind == Kind.REFUSED and "out of sequence: expected 2, got 5" in body.decode()
    assert sock.recv(1) == b""  # closed: nothing more is answered on a channel out of step
    sock = raw_tcp(ep, chan)
    assert read_frame(sock)[0].kind == Kind.WELCOME
    Header(Kind.REQUEST, 1, 0, 3, 2, shard.cfg.dim, 1, 1, 0, 1 << 30).pack_into(buf.buf)
    sock.sendall(buf.buf[:HEADER_BYTES])
    h, body = read_frame(sock)
    assert h.kind == Kind.REFUSED and "oversized frame" in body.decode()
    assert sock.recv(1) == b""  # closed: the stream cannot be trusted past an unread frame
    bad = raw_tcp(ep, chan, token=bytes(TOKEN_BYTES))
    h, body = read_frame(bad)
    assert h.kind == Kind.REFUSED and "wrong token" in body.decode()


SERVER = """
import json, sys, time, torch
from moray.actors.dataplane.endpoint import ShardEndpoint
from moray.actors.dataplane.frames import Limits
def slow(layer, x, ids, gates, tags):
    time.sleep(60)
    return x
ep = ShardEndpoint(slow, Limits(0, 64, torch.float32, 4))
print(json.dumps(ep.address()), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("shared", [True, False], ids=["shm", "tcp"])
def test_a_killed_peer_is_noticed_within_a_second(shared: bool) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        address = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        endpoint = Endpoint.from_dict({**address, "shard": 0, "replica": "victim", "node": None})

        async def run() -> float:
            channel = open_channel(endpoint, ChannelSpec(8, D, torch.float32), shared)
            channel.attach(asyncio.get_running_loop())
            pending = asyncio.ensure_future(call(channel, 0, *request(2)))
            await asyncio.sleep(0.3)
            assert not pending.done()
            killed = time.perf_counter()
            os.kill(proc.pid, signal.SIGKILL)
            with pytest.raises(PeerGoneError, match="closed the channel"):
                await asyncio.wait_for(pending, 5)
            assert not channel.usable
            channel.close()
            return time.perf_counter() - killed

        assert asyncio.run(run()) < 1.0
    finally:
        proc.kill()
        proc.wait()


def test_drain_waits_for_the_dispatcher_to_close(shard: ExpertShard,
                                                 endpoint: tuple[ShardEndpoint, Endpoint]) -> None:
    ep = endpoint[0]

    async def run() -> int:
        channel = open_channel(endpoint[1], spec(shard), True)
        channel.attach(asyncio.get_running_loop())
        result: list[int] = []
        drainer = threading.Thread(target=lambda: result.append(ep.drain(5.0)))
        drainer.start()
        while not channel.draining:
            await asyncio.sleep(0.01)
        assert not channel.usable and ep.connected() == 1
        channel.close()
        await asyncio.to_thread(drainer.join)
        return result[0]

    assert asyncio.run(run()) == 0
    with pytest.raises(RemoteError, match="draining"):
        open_channel(endpoint[1], spec(shard), True)


def test_spec_and_endpoint_must_agree(shard: ExpertShard, endpoint: tuple[ShardEndpoint, Endpoint]) -> None:
    with pytest.raises(RemoteError, match="channel of dim 32"):
        open_channel(endpoint[1], ChannelSpec(8, 32, torch.float32), False)
    with pytest.raises(RemoteError, match="oversized channel"):
        open_channel(endpoint[1], ChannelSpec(1 << 24, shard.cfg.dim, torch.float32), False)


def open_fds() -> dict[str, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the directory listing's own descriptor
            pass
    return found


def test_nothing_left_behind(shard: ExpertShard, endpoint: tuple[ShardEndpoint, Endpoint]) -> Any:
    """Open and close channels both ways: no /dev/shm entry, no open descriptor left in this process."""
    fds = open_fds()
    before = shm_entries()

    async def run() -> None:
        for shared in (True, False, True):
            channel = open_channel(endpoint[1], spec(shard), shared)
            channel.attach(asyncio.get_running_loop())
            await call(channel, 0, torch.randn(2, shard.cfg.dim), torch.tensor([[0, 1], [1, 2]]),
                       torch.rand(2, 2))
            channel.close()

    asyncio.run(run())
    deadline = time.monotonic() + 2
    while endpoint[0].connected() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shm_entries() == before
    assert {fd: what for fd, what in open_fds().items() if fds.get(fd) != what} == {}
