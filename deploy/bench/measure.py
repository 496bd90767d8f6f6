"""One measured run and its bounds: warm up, drive the jobs, read the engine's step split (`measure`);
repeat and keep the fastest while other processes are quiet (`best_of`); the model's weight bytes and
this machine's memory bandwidth, whose ratio bounds decode tokens/s (`bound`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moray.deploy.bench.workload import Job, drive, make_jobs, router_seconds, step_split, summarize

log = logging.getLogger(__name__)


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


def run_system(target: Any, jobs: list[Job], concurrency: int, name: str, progress: bool,
               facts: dict[str, Any] | None) -> dict[str, Any]:
    if hasattr(target, "run_batch"):  # static batches (transformers generate)
        return dict(target.run_batch(jobs, concurrency, progress))
    return asyncio.run(measure(target, jobs, concurrency, f"{name} c={concurrency}", progress, facts))


def level_jobs(args: argparse.Namespace, concurrency: int, vocab_size: int, repeat: int,
               default_n: int = 0) -> list[Job]:
    """The jobs of one concurrency level and repeat: the same for every system measured."""
    n = args.num_requests or default_n or concurrency
    return make_jobs(n, args.prompt_len, args.output_len, vocab_size, args.seed + concurrency + 1000 * repeat,
                     args.constrained)


def run_repeat(target: Any, args: argparse.Namespace, concurrency: int, name: str, facts: dict[str, Any],
               repeat: int, default_n: int = 0) -> dict[str, Any]:
    jobs = level_jobs(args, concurrency, facts["vocab_size"] if facts else args.vocab_size, repeat, default_n)
    return run_system(target, jobs, concurrency, name, not args.no_progress, facts)


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


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


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


def measure_bandwidth(gib: float = 1.0, repeats: int = 3) -> dict[str, float]:
    """Best of `repeats`: copying a `gib` GiB fp32 tensor (bytes read + written per second, STREAM's
    convention) and summing it (bytes read per second), with torch's threads."""
    import torch

    n = int(gib * 2**30) // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)
    copy_s, read_s = float("inf"), float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        copy_s = min(copy_s, time.perf_counter() - t)
        t = time.perf_counter()
        src.sum()
        read_s = min(read_s, time.perf_counter() - t)
    size = 4 * n
    del src, dst
    gc.collect()
    return {"bytes": size, "copy_bytes_per_s": 2 * size / copy_s, "read_bytes_per_s": size / read_s}
