"""The engine client: how the API reaches the engine, the same way in Serve and in one process.

`EngineClient` is what the ingress calls. `ServeEngine` wraps the dispatcher deployment's handle
(streaming `generate` calls, a `DispatcherWatch` that answers 503 at once while the dispatcher is
dead, Serve's state for health, status and routing counts); `LocalEngine` wraps an `AsyncEngine` in
this process (tests, the benchmark), where there is no Serve state to report.

One request's engine jobs (its n choices, its prompts) travel as ONE stream, `generate_steps`: each
streamed item is the list of events produced since the last one, that is all the tokens an engine
step gave these jobs (vLLM's engine core likewise sends one message per step). Serve's streaming
costs tens of µs of Python per item on each end, so a request with n choices costs one item a step,
not n. Closing a stream before its end (client gone, timeout, error) frees the engine's sequences.

Streams survive their dispatcher: `ServeEngine.generate_steps` remembers the tokens it has passed on,
and when the call fails because the dispatcher replica died (not because of an error raised inside it),
it waits for a live replica (another one, or Serve's replacement) up to `resume_timeout_s` and sends
the unfinished requests again as continuations (`GenerateRequest.generated`: the prompt and the delivered
tokens are prefilled, sampling continues at the same position, stop rules see the delivered text,
usage counts the whole request). The caller sees a pause, never a repeated or skipped token. A
stream whose client has gone is closed here first, so it is never resumed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from moray.actors.dispatcher import DispatcherUnavailableError, DispatcherWatch, actor_died
from moray.deploy.api.errors import APIError, unwrap
from moray.deploy.serve import state
from moray.model.engine import AsyncEngine, GenerateRequest, TokenEvent

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 5.0  # longest wait for the expert-shard replicas' load reports in /v1/moray/status
RESUME_POLL_S = 0.1  # how often a stream waiting to resume looks for a live dispatcher


class EngineClient(Protocol):
    """The engine as the API sees it."""

    def generate_steps(self, requests: list[GenerateRequest]) -> AsyncIterator[list[TokenEvent]]:
        """The requests' events, one list per engine step (all the tokens a step gave them); raises the
        engine's own errors (RequestError, QueueFullError, ...)."""
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

    def __init__(self, handle: Any, app_name: str, resume_timeout_s: float = 0.0) -> None:
        self.handle, self.app_name, self.resume_timeout_s = handle, app_name, resume_timeout_s
        self.watch = DispatcherWatch(lambda: self.handle.check_health.remote())
        self.resumed = 0  # streams continued on another dispatcher replica

    async def generate_steps(self, requests: list[GenerateRequest]) -> AsyncIterator[list[TokenEvent]]:
        self.watch.check()
        if self.resume_timeout_s > 0:
            requests = [_seeded(r) for r in requests]
        delivered = {r.request_id: list(r.generated) for r in requests}
        unfinished = {r.request_id: r for r in requests}
        attempt, deadline = requests, 0.0
        while True:
            response, finished = self.handle.generate_steps.options(stream=True).remote(attempt), False
            try:
                async for events in response:
                    for event in events:
                        delivered[event.request_id].append(event.token_id)
                        if event.finish_reason is not None:
                            unfinished.pop(event.request_id, None)
                    yield events
                finished = True
                return
            except Exception as e:
                self.watch.failed(e)
                if not actor_died(e) or self.resume_timeout_s <= 0:
                    raise unwrap(e) from None
                deadline = deadline or time.monotonic() + self.resume_timeout_s
                log.warning("requests %s: their dispatcher died; resuming on a live replica",
                            ", ".join(unfinished))
            finally:
                if not finished:
                    response.cancel()
            await self._until_live(deadline)
            attempt = [dataclasses.replace(r, generated=list(delivered[i])) for i, r in unfinished.items()]
            self.resumed += len(attempt)

    async def _until_live(self, deadline: float) -> None:
        """Wait until a dispatcher replica answers again (the watch's probe); past `deadline`, 503."""
        while self.watch.down_since is not None:
            if time.monotonic() > deadline:
                raise DispatcherUnavailableError(f"no dispatcher replica came back within "
                                                 f"{self.resume_timeout_s:g} s to resume the stream")
            await asyncio.sleep(RESUME_POLL_S)

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


def _seeded(request: GenerateRequest) -> GenerateRequest:
    """A sampled request without a seed gets one here, so that a continuation draws the tokens the
    first attempt would have (sampling is keyed by (seed, position))."""
    params = request.params
    if params.temperature == 0 or params.seed is not None:
        return request
    return dataclasses.replace(request, params=dataclasses.replace(params, seed=secrets.randbits(62)))


class LocalEngine:
    """An `AsyncEngine` in this process, every expert local or behind its own backend."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def generate_steps(self, requests: list[GenerateRequest]) -> AsyncIterator[list[TokenEvent]]:
        stream = self.engine.generate_steps(requests)
        try:
            async for events in stream:
                yield events
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


def engine_client(engine: Any, app_name: str, resume_timeout_s: float = 0.0) -> EngineClient:
    """`engine` as an `EngineClient`: a Serve handle (what Serve passes the ingress) is wrapped."""
    from ray.serve.handle import DeploymentHandle

    if isinstance(engine, DeploymentHandle):
        return ServeEngine(engine, app_name, resume_timeout_s)
    return engine  # type: ignore[no-any-return]
