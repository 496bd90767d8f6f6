"""One request's choices run side by side: start them all, merge their events, time them.

A request's jobs (its choices and prompts) come from the engine as one stream whose items each hold
an engine step's events for all of them (`EngineClient.generate_steps`). Each job's first token is
awaited before a response starts (`start`), so a request the engine refuses is a real error, not a
broken stream; then `merge` yields every job's events as they come, recorded in `Choice`s, and closes
the stream (the engine cancels what is left) when the caller stops. Both are bounded by the server's
`request_timeout_s` (504).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from moray.deploy.api.errors import APIError, to_api_error
from moray.deploy.api.protocol import Choice, Job, usage
from moray.deploy.serve import metrics
from moray.model.engine import TokenEvent

Steps = AsyncIterator[list[TokenEvent]]  # every job's events, one list per engine step


@dataclass
class Started:
    """A request whose every job has produced its first event: the events read so far, and the rest."""

    jobs: list[Job]
    read: list[TokenEvent]
    steps: Steps


class Timer:
    """TTFT, inter-token gaps and end-to-end latency of one request, recorded as metrics."""

    def __init__(self) -> None:
        self.start, self.first = time.perf_counter(), True

    def token(self, choice: Choice) -> None:
        t = time.perf_counter()
        if self.first:
            metrics.record_latencies(ttft_s=t - self.start)
        elif choice.last_t is not None:
            metrics.record_latencies(itl_s=t - choice.last_t)
        self.first, choice.last_t = False, t

    def done(self, choices: Sequence[Choice]) -> None:
        metrics.record_latencies(e2e_s=time.perf_counter() - self.start)
        u = usage(choices)
        metrics.record_tokens(u.prompt_tokens, u.completion_tokens)


async def start(jobs: list[Job], steps: Steps, timeout_s: float) -> Started:
    """Read the jobs' stream until each has its first event: refusals surface before any output."""
    read: list[TokenEvent] = []

    async def firsts() -> None:
        waiting = {j.request_id for j in jobs}
        while waiting:
            events = await anext(steps)
            read.extend(events)
            waiting -= {e.request_id for e in events}

    try:
        await asyncio.wait_for(firsts(), timeout_s)
    except Exception as e:
        await steps.aclose()  # type: ignore[attr-defined]  # an async generator
        if isinstance(e, asyncio.TimeoutError):
            raise APIError(504, f"the request did not start within {timeout_s:g} s") from None
        raise to_api_error(e) from None
    return Started(jobs, read, steps)


async def merge(started: Started, timeout_s: float) -> AsyncIterator[tuple[Choice, TokenEvent]]:
    """All jobs' events as they come, recorded in `Choice`s; closes the stream (cancelling what is left)
    on exit."""
    choices = {j.request_id: Choice(j) for j in started.jobs}
    timer, deadline = Timer(), time.monotonic() + timeout_s
    events: list[TokenEvent] | None = started.read
    try:
        while events is not None:
            for event in events:
                choice = choices[event.request_id]
                timer.token(choice)
                choice.events.append(event)
                choice.text += event.text
                choice.finish_reason = event.finish_reason or choice.finish_reason
                yield choice, event
            events = await _next_step(started.steps, deadline, timeout_s)
        timer.done(list(choices.values()))
    finally:
        await started.steps.aclose()  # type: ignore[attr-defined]


async def _next_step(steps: Steps, deadline: float, timeout_s: float) -> list[TokenEvent] | None:
    """The stream's next item, None at its end; its errors as `APIError`s, 504 past `deadline`."""
    try:
        return await asyncio.wait_for(anext(steps, None), max(deadline - time.monotonic(), 0.0))
    except asyncio.TimeoutError:
        raise APIError(504, f"the request did not finish within {timeout_s:g} s") from None
    except Exception as e:
        raise to_api_error(e) from None


async def collect(jobs: list[Job], steps: Steps, timeout_s: float) -> list[Choice]:
    """Every job to its end, in the order of `jobs`."""
    choices: dict[int, Choice] = {}
    async for choice, _ in merge(await start(jobs, steps, timeout_s), timeout_s):
        choices[choice.job.index] = choice
    return [choices[j.index] for j in jobs]
