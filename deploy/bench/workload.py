"""The benchmark's workload and what it measures: jobs, closed-loop clients, per-request records and
their summary (tokens/s, TTFT, ITL percentiles), and the engine's per-step time split.

Every mode drives the same closed loop: `concurrency` clients, each sending its next request as
soon as its last one finished, over a fixed list of jobs (random prompt token ids, lengths drawn
from `--prompt-len` / `--output-len`, greedy, EOS ignored so every request makes its full length).
Per request it records the arrival time of every streamed chunk. Metric definitions
(docs/performance.md repeats them):
- output tokens/s = all completion tokens / wall time of the run (first request sent to last done).
- prefill tokens/s = prompt tokens / time during which some request was waiting for its first token.
- decode tokens/s = completion tokens after the first / time during which some request was decoding.
- ITL = gaps between successive chunks of one request (one chunk per token in every mode here).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


Stream = Callable[["Job"], AsyncIterator[int]]  # yields the tokens each streamed chunk carries


QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class LengthDist:
    """A fixed length (`64`) or a uniform range (`32:128`, both ends included)."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        try:
            parts = [int(p) for p in str(text).split(":")]
        except ValueError:
            parts = []
        low, high = (parts[0], parts[-1]) if parts else (0, 0)
        if len(parts) > 2 or low < 1 or high < low:
            raise argparse.ArgumentTypeError(f"length must be N or LOW:HIGH, 1 <= LOW <= HIGH; got {text!r}")
        return cls(low, high)

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


# `--constrained`'s JSON schema: mid-sized (nested object, array with bounds, enum, bounded numbers,
# required and optional fields), as an application asking for structured output would send.
BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    max_tokens: int
    schema: dict[str, Any] | None = None  # the output must be JSON matching it (`--constrained`)


def make_jobs(n: int, prompt_len: LengthDist, output_len: LengthDist, vocab_size: int,
              seed: int, constrained: float = 0.0) -> list[Job]:
    """`n` jobs of random token ids in [3, vocab) (no BOS/EOS/UNK), the same for every system; the
    share `constrained` of them (spread evenly) asks for JSON matching `BENCH_SCHEMA`: such a job ends
    where its JSON does (EOS ignored otherwise)."""
    rng = random.Random(seed)
    jobs = [Job([rng.randrange(3, vocab_size) for _ in range(prompt_len.sample(rng))], output_len.sample(rng))
            for _ in range(n)]
    return [Job(j.prompt_ids, j.max_tokens, BENCH_SCHEMA) if int((i + 1) * constrained) > int(i * constrained)
            else j for i, j in enumerate(jobs)]


class UsageCount(int):
    """Tokens a stream reports at its end (OpenAI `usage`) beyond the chunks it sent: counted, not timed."""


@dataclass
class RequestRecord:
    prompt_tokens: int
    start: float
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    end: float = 0.0
    error: str | None = None


async def drive(stream: Stream, jobs: Iterable[Job], concurrency: int, desc: str = "",
                progress: bool = True) -> tuple[list[RequestRecord], float, float]:
    """Run `jobs` with `concurrency` closed-loop clients; (records, start, end) in perf_counter seconds."""
    from tqdm import tqdm

    pending, records = iter(jobs), []
    total = len(jobs) if isinstance(jobs, Sized) else None
    bar = tqdm(total=total, desc=desc, unit="req", disable=not progress, leave=False)

    async def client() -> None:
        for job in pending:  # one shared iterator: each job goes to exactly one client
            rec = RequestRecord(len(job.prompt_ids), time.perf_counter())
            records.append(rec)
            try:
                async for n in stream(job):
                    rec.output_tokens += n
                    if n and not isinstance(n, UsageCount):
                        rec.chunk_times.append(time.perf_counter())
            except Exception as e:  # noqa: BLE001 - a failed request is counted, the run goes on
                rec.error = f"{type(e).__name__}: {e}"
            rec.end = time.perf_counter()
            bar.update(1)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(max(1, min(concurrency, total or concurrency)))))
    bar.close()
    return records, start, time.perf_counter()


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation (numpy's default method); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def describe(values: Sequence[float]) -> dict[str, float | None]:
    """mean and p50/p90/p99 (None for no values)."""
    out: dict[str, float | None] = {"mean": sum(values) / len(values) if values else None}
    out.update({f"p{q}": percentile(values, q) for q in QUANTILES})
    return out


def union_length(intervals: Sequence[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlaps counted once)."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def summarize(records: Sequence[RequestRecord], start: float, end: float) -> dict[str, Any]:
    """Throughput and latency of one run (the keys docs/performance.md documents)."""
    ok = [r for r in records if r.error is None and r.chunk_times]
    duration = max(end - start, 1e-9)
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    prefill_span = union_length([(r.start, r.chunk_times[0]) for r in ok])
    decode_span = union_length([(r.chunk_times[0], r.chunk_times[-1]) for r in ok])
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    return {
        "requests": len(ok), "errors": len(records) - len(ok),
        "error_examples": sorted({r.error for r in records if r.error})[:3],
        "prompt_tokens": prompt, "output_tokens": output, "duration_s": duration,
        "requests_per_s": len(ok) / duration, "output_tokens_per_s": output / duration,
        "prefill_tokens_per_s": prompt / prefill_span if prefill_span > 0 else None,
        "decode_tokens_per_s": (output - len(ok)) / decode_span if decode_span > 0 else None,
        "ttft_s": describe([r.chunk_times[0] - r.start for r in ok]),
        "itl_s": describe(itl), "e2e_s": describe([r.end - r.start for r in ok]),
    }


def step_split(before: dict[str, Any], after: dict[str, Any], wall_s: float, router_s_per_call: float,
               num_layers: int) -> dict[str, Any] | None:
    """Per-step ms of attention / router / transport / expert compute / sampling between two snapshots.

    Expert compute is the busiest shard's busy time (shards run side by side); transport is the rest of
    the time the engine waited on experts. In process there is no transport. The router is not timed by
    the engine: its share is estimated from a micro-benchmark of `route` (`router_s_per_call`). With
    ping-pong the engine sums both halves' expert waits, which overlap attention: attention and
    transport are then unknown (None) and only the summed wait is given.
    """
    def delta(key: str) -> float:
        return float(after.get(key, 0.0)) - float(before.get(key, 0.0))

    steps = delta("time_steps")
    if steps <= 0:
        return None
    busy = [b - a for a, b in zip(before.get("shard_busy_s", []), after.get("shard_busy_s", []),
                                  strict=False)]
    waited, total = delta("time_experts"), delta("time_total")
    compute = max(busy) if busy else waited
    router = min(steps * num_layers * router_s_per_call, max(delta("time_attention"), 0.0))
    overlapped = waited > total - delta("time_sampling")  # ping-pong: both halves' waits summed
    parts: dict[str, float | None] = {
        "attention": None if overlapped else delta("time_attention") - router, "router": router,
        "transport": None if overlapped else max(waited - compute, 0.0),
        "expert_compute": min(compute, waited), "sampling": delta("time_sampling"), "total": total,
        "expert_wait_summed": waited}
    transport = parts["transport"]
    return {
        "steps": int(steps), "tokens_per_step": delta("time_tokens") / steps, "overlapped": overlapped,
        "ms_per_step": {k: None if v is None else 1e3 * v / steps for k, v in parts.items()},
        "outside_compute_fraction": transport / total if transport is not None and total > 0 else None,
        "engine_busy_fraction": total / wall_s if wall_s > 0 else None,
        "shard_utilization": [b / wall_s for b in busy] if busy else None,
    }


def router_seconds(dim: int, num_experts: int, top_k: int, rows: int, repeats: int = 50) -> float:
    """Seconds per `route` call on `rows` tokens (the router's share of a layer's attention side)."""
    import torch

    from moray.model.layers import route

    x, gate = torch.randn(max(rows, 1), dim), torch.randn(num_experts, dim)
    best = float("inf")
    for _ in range(5):  # the best of 5 rounds: other processes' bursts do not count
        t = time.perf_counter()
        for _ in range(repeats):
            route(x, gate, top_k)
        best = min(best, (time.perf_counter() - t) / repeats)
    return best
