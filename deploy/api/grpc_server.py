"""moray's own gRPC server for `moray serve`: the `Moray` service on exactly the host HTTP binds.

Ray Serve's gRPC proxy binds every interface (`[::]:port`, no host option), so `moray serve` does not
start it. Instead, when asked for a gRPC port, it runs this server in its own process, bound to
`ServerConfig.host` (127.0.0.1 unless told otherwise), and forwards each call to the ingress
deployment through a Serve handle (`GrpcMixin.Generate` / `GenerateStream`, with the caller's
metadata for the API key). Under KubeRay, Serve's proxy serves the same methods (`grpc_options` in
the manifests), where binding the pod's address is what is wanted.

A failure comes back as the `GrpcError` the ingress raised (its status code and details); a client
that cancels a stream cancels the engine request behind it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc

from moray.deploy.api import moray_pb2, moray_pb2_grpc
from moray.deploy.api.errors import unwrap
from moray.deploy.api.grpc import GrpcError, status_of

log = logging.getLogger(__name__)

STOP_GRACE_S = 2.0


def _metadata(context: grpc.aio.ServicerContext) -> list[tuple[str, str]]:
    return [(k, v if isinstance(v, str) else v.decode("utf-8", "replace"))
            for k, v in context.invocation_metadata() or ()]


class Forwarder(moray_pb2_grpc.MorayServicer):
    """The `Moray` service, each call forwarded to the ingress deployment's handle."""

    def __init__(self, ingress: Any) -> None:
        self.ingress = ingress

    async def Generate(self, request: moray_pb2.GenerateRequest,  # noqa: N802 - the RPC's name
                       context: grpc.aio.ServicerContext) -> moray_pb2.GenerateReply:
        try:
            reply: moray_pb2.GenerateReply = await self.ingress.Generate.remote(
                request, metadata=_metadata(context))
            return reply
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            status = _status(e)
        await context.abort(status.code, status.details)
        raise AssertionError("abort() raises")  # pragma: no cover

    async def GenerateStream(self, request: moray_pb2.GenerateRequest,  # noqa: N802 - the RPC's name
                             context: grpc.aio.ServicerContext) -> AsyncIterator[moray_pb2.GenerateChunk]:
        stream = self.ingress.options(stream=True).GenerateStream.remote(request, metadata=_metadata(context))
        try:
            async for chunk in stream:
                yield chunk
            return
        except asyncio.CancelledError:
            stream.cancel()  # the client went away: free the engine's sequence
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            status = _status(e)
        await context.abort(status.code, status.details)


def _status(error: BaseException) -> GrpcError:
    return status_of(unwrap(error))


class GrpcServer:
    """A `grpc.aio` server on `host:port` in a thread of its own (its own event loop)."""

    def __init__(self, host: str, port: int, ingress: Any) -> None:
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.ingress = ingress
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()  # bound to the server's loop when first awaited there
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="moray-grpc", daemon=True)

    def start(self, timeout_s: float = 30.0) -> GrpcServer:
        """Bind and serve; raises what binding raised (e.g. the port is taken)."""
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"the gRPC server on {self.address} did not start in {timeout_s:g} s")
        if self._error is not None:
            raise self._error
        log.info("gRPC API on %s", self.address)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        """Start, report to `start()`, serve until `stop()`, then stop (running calls get a grace time)."""
        try:
            server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])  # a taken port is an error
            moray_pb2_grpc.add_MorayServicer_to_server(Forwarder(self.ingress), server)
            if server.add_insecure_port(self.address) == 0:
                raise OSError(f"cannot listen on {self.address}")
            await server.start()
        except BaseException as e:  # noqa: BLE001 - reported to start()'s caller
            self._error = e
            return
        finally:
            self._started.set()
        await self._stopping.wait()
        await server.stop(STOP_GRACE_S)

    def stop(self) -> None:
        """Stop taking calls, let running ones finish for a moment, end the thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout=STOP_GRACE_S + 5)
