"""The engine client: how the API reaches the engine, the same way in Serve and in one process.

`EngineClient` is what the ingress calls. `ServeEngine` wraps the dispatcher deployment's handle
(streaming `generate` calls, a `DispatcherWatch` that answers 503 at once while the dispatcher is
dead, Serve's state for health, status and routing counts); `LocalEngine` wraps an `AsyncEngine` in
this process (tests, the benchmark), where there is no Serve state to report.

Closing a `generate` stream before its end (client gone, timeout, error) frees the engine's sequence.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from moray.actors.dispatcher import DispatcherWatch
from moray.deploy.api.errors import APIError, unwrap
from moray.deploy.serve import state
from moray.model.engine import AsyncEngine, GenerateRequest, TokenEvent

STATUS_TIMEOUT_S = 5.0  # longest wait for the expert-shard replicas' load reports in /v1/moray/status


class EngineClient(Protocol):
    """The engine as the API sees it."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """The request's events; raises the engine's own errors (RequestError, QueueFullError, ...)."""
        ...

    async def stats(self) -> dict[str, Any]:
        """The dispatcher's engine stats (queue, batch, KV blocks, step times)."""
        ...

    async def check_health(self) -> None:
        """Raise unless the engine can serve."""
        ...

    async def app_status(self) -> dict[str, Any]:
        """Serve's view of the app (deployments, shard load reports, expert tables); {} in process."""
        ...

    async def routing_counts(self) -> tuple[list[list[int]], int]:
        """Tokens routed per [layer][expert] so far, and how many shards answered."""
        ...


class ServeEngine:
    """The dispatcher deployment through its Serve handle (inside the ingress replica)."""

    def __init__(self, handle: Any, app_name: str) -> None:
        self.handle, self.app_name = handle, app_name
        self.watch = DispatcherWatch(lambda: self.handle.check_health.remote())

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        self.watch.check()
        response, finished = self.handle.generate.options(stream=True).remote(request), False
        try:
            async for event in response:
                yield event
            finished = True
        except Exception as e:
            self.watch.failed(e)
            raise unwrap(e) from None
        finally:
            if not finished:
                response.cancel()

    async def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = await self.handle.stats.remote()
        return stats

    async def check_health(self) -> None:
        self.watch.check()
        deployments = await asyncio.to_thread(state.deployment_states, self.app_name)
        status = deployments.get(state.DISPATCHER, {}).get("status", "missing")
        if status not in state.LIVE_STATUSES:
            raise APIError(503, f"the dispatcher is {status.lower()}")

    async def app_status(self) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(state.app_status, self.app_name, STATUS_TIMEOUT_S)
        except LookupError as e:  # the app is being deleted under us
            raise APIError(503, str(e)) from None

    async def routing_counts(self) -> tuple[list[list[int]], int]:
        try:
            return await state.shard_token_counts(self.app_name)
        except LookupError as e:
            raise APIError(503, str(e)) from None


class LocalEngine:
    """An `AsyncEngine` in this process, every expert local or behind its own backend."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        stream = self.engine.generate(request)
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()  # type: ignore[attr-defined]  # an async generator

    async def stats(self) -> dict[str, Any]:
        return dict(self.engine.stats())

    async def check_health(self) -> None:
        """The engine lives in this process: it serves while the process does."""

    async def app_status(self) -> dict[str, Any]:
        return {}

    async def routing_counts(self) -> tuple[list[list[int]], int]:
        raise APIError(404, "routing counts come from the expert-shard deployments (Serve only)")


def engine_client(engine: Any, app_name: str) -> EngineClient:
    """`engine` as an `EngineClient`: a Serve handle (what Serve passes the ingress) is wrapped."""
    from ray.serve.handle import DeploymentHandle

    return ServeEngine(engine, app_name) if isinstance(engine, DeploymentHandle) else engine  # type: ignore[no-any-return]
