"""moray's own gRPC server without Ray: a real `grpc.aio` server on loopback in front of the real ingress
(an in-process engine on the tiny checkpoint), reached through a stand-in for Serve's deployment handle.

It must give what the ingress gives (tokens, unary and streamed), pass the caller's metadata on (the
API key), turn the ingress's failures into status codes, listen on the host it was given only, and
stop cleanly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import psutil
import pytest

from moray.deploy.api import moray_pb2, moray_pb2_grpc
from moray.deploy.api.grpc_server import GrpcServer
from moray.deploy.api.ingress import OpenAIIngress
from moray.deploy.serve.network import free_port

KEY = "sk-api-test-" + "k" * 20  # conftest's KEY


class Streamed:
    """What a streaming handle call returns: an async iterator that can be cancelled."""

    def __init__(self, events: AsyncIterator[Any]) -> None:
        self.events = events

    def __aiter__(self) -> Streamed:
        return self

    async def __anext__(self) -> Any:
        return await anext(self.events)

    def cancel(self) -> None:
        asyncio.ensure_future(self.events.aclose())  # type: ignore[attr-defined]


class LocalHandle:
    """Serve's `DeploymentHandle` surface the server uses (`.method.remote(...)`, `.options(stream=)`),
    calling an object in this process: the server runs its calls on its own event loop, as it does
    through a real handle."""

    def __init__(self, target: Any, stream: bool = False) -> None:
        self.target, self.stream = target, stream

    def options(self, stream: bool = False) -> LocalHandle:
        return LocalHandle(self.target, stream)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.target, name)
        remote = (lambda *a, **k: Streamed(method(*a, **k))) if self.stream else method
        return type("Method", (), {"remote": staticmethod(remote)})


@pytest.fixture(scope="module")
def server(ingress: OpenAIIngress) -> Iterator[GrpcServer]:
    running = GrpcServer("127.0.0.1", free_port(), LocalHandle(ingress)).start()
    yield running
    running.stop()


def call(server: GrpcServer, key: str | None, stream: bool = False, **fields: Any) -> list[int]:
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    request = moray_pb2.GenerateRequest(**{"prompt": "Hello", "max_tokens": 3, "temperature": 0.0, **fields})
    with grpc.insecure_channel(server.address) as channel:
        stub = moray_pb2_grpc.MorayStub(channel)
        if stream:
            return [c.token_id for c in stub.GenerateStream(request, metadata=metadata, timeout=60)]
        return list(stub.Generate(request, metadata=metadata, timeout=60).token_ids)


def test_answers_as_the_ingress_does(server: GrpcServer, ingress: OpenAIIngress) -> None:
    context_free = asyncio.run(ingress.Generate(moray_pb2.GenerateRequest(
        prompt="Hello", max_tokens=3, temperature=0.0), metadata=[("authorization", f"Bearer {KEY}")]))
    tokens = call(server, KEY)
    assert tokens == list(context_free.token_ids) and len(tokens) == 3
    assert call(server, KEY, stream=True) == tokens


@pytest.mark.parametrize(("key", "fields", "code"), [
    (None, {}, grpc.StatusCode.UNAUTHENTICATED),
    ("wrong", {}, grpc.StatusCode.UNAUTHENTICATED),
    (KEY, {"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT),
    (KEY, {"model": "other"}, grpc.StatusCode.NOT_FOUND),
])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_failures_are_status_codes(server: GrpcServer, key: str | None, fields: dict, code: grpc.StatusCode,
                                   stream: bool) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(server, key, stream, **fields)
    assert info.value.code() == code
    assert KEY not in (info.value.details() or "")


def test_listens_on_its_host_only(server: GrpcServer) -> None:
    port = int(server.address.rpartition(":")[2])
    mine = {c.laddr.ip for c in psutil.Process().net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert mine and all(ip.removeprefix("::ffff:") == "127.0.0.1" for ip in mine), mine


def test_a_taken_port_fails_start_and_stop_frees_the_port(ingress: OpenAIIngress) -> None:
    first = GrpcServer("127.0.0.1", free_port(), LocalHandle(ingress)).start()
    port = int(first.address.rpartition(":")[2])
    with pytest.raises(Exception, match=str(port)):  # noqa: B017 - grpc raises RuntimeError, we OSError
        GrpcServer("127.0.0.1", port, LocalHandle(ingress)).start()
    first.stop()
    again = GrpcServer("127.0.0.1", port, LocalHandle(ingress)).start()
    again.stop()
