"""One request's choices run side by side: start them all, merge their events, time them.

Each choice's first token is awaited before a response starts (`start`), so a request the engine
refuses is a real error, not a broken stream; then `merge` yields every choice's events as they
come, recorded in `Choice`s, and cancels what is left when the caller stops. Both are bounded by
the server's `request_timeout_s` (504).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

from moray.deploy.api.errors import APIError, to_api_error
from moray.deploy.api.protocol import Choice, Job, usage
from moray.deploy.serve import metrics
from moray.model.engine import TokenEvent

Started = tuple[Job, TokenEvent, AsyncIterator[TokenEvent]]
StreamOf = Callable[[Job], AsyncIterator[TokenEvent]]


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


async def start(jobs: list[Job], stream_of: StreamOf, timeout_s: float) -> list[Started]:
    """Submit every choice and await each one's first event: refusals surface before any output."""
    streams = [stream_of(j) for j in jobs]
    firsts_of_all = asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
    try:
        firsts = await asyncio.wait_for(firsts_of_all, timeout_s)
    except asyncio.TimeoutError:
        firsts = [APIError(504, f"the request did not start within {timeout_s:g} s")]
    failed = next((f for f in firsts if isinstance(f, BaseException)), None)
    if failed is not None:
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)  # type: ignore[attr-defined]
        raise to_api_error(failed)
    return [(j, f, s) for j, f, s in zip(jobs, firsts, streams, strict=True)]  # type: ignore[misc]


async def _pump(queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]], job: Job,
                first: TokenEvent, rest: AsyncIterator[TokenEvent]) -> None:
    """One choice's events into the shared queue, then None (or the error that ended it)."""
    try:
        queue.put_nowait((job.index, first))
        if first.finish_reason is None:
            async for event in rest:
                queue.put_nowait((job.index, event))
    except Exception as e:
        queue.put_nowait((job.index, e))
    finally:
        queue.put_nowait((job.index, None))
        await rest.aclose()  # type: ignore[attr-defined]


async def merge(started: list[Started], timeout_s: float) -> AsyncIterator[tuple[Choice, TokenEvent]]:
    """All choices' events as they come, recorded in `Choice`s; cancels the rest on exit."""
    choices = {j.index: Choice(j) for j, _, _ in started}
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(queue, *s)) for s in started]
    timer, live, deadline = Timer(), len(tasks), time.monotonic() + timeout_s
    try:
        while live:
            index, item = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0.0))
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise to_api_error(item)
            else:
                choice = choices[index]
                timer.token(choice)
                choice.events.append(item)
                choice.text += item.text
                choice.finish_reason = item.finish_reason or choice.finish_reason
                yield choice, item
        timer.done(list(choices.values()))
    except asyncio.TimeoutError:
        raise APIError(504, f"the request did not finish within {timeout_s:g} s") from None
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(jobs: list[Job], stream_of: StreamOf, timeout_s: float) -> list[Choice]:
    """Every choice to its end, in the order of `jobs`."""
    choices: dict[int, Choice] = {}
    async for choice, _ in merge(await start(jobs, stream_of, timeout_s), timeout_s):
        choices[choice.job.index] = choice
    return [choices[j.index] for j in jobs]
