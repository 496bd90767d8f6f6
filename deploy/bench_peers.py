"""The peers and servers `moray bench` measures besides the engine itself, and its scenarios.

- `TransformersTarget`: transformers' `MixtralForCausalLM.generate`, greedy, static left-padded batches
  of the concurrency's size (the baseline users would pick first). Per-token times come from a
  `StoppingCriteria` that stamps every generation step.
- `HttpTarget`: streaming OpenAI completions (`/v1/completions`, token-id prompts, `ignore_eos`,
  `logprobs=0` so every token is its own chunk) against any server; `ServeTarget` starts moray's Serve
  app in this Ray first, `VllmTarget` starts vLLM's CPU build from its own venv (DESIGN.md, "A peer
  on this machine") and stops it after.
- `measure_bandwidth`: this machine's memory copy and read bandwidth (the bound's denominator).
- `run_online`, `run_soak` (RSS of every Ray process every 10 s), `run_skewed` (issue 6).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from moray.deploy.bench import (
    ActorsTarget,
    Job,
    LocalTarget,
    RequestRecord,
    UsageCount,
    best_of,
    drive,
    ensure_ray,
    finish_report,
    make_jobs,
    model_facts,
    new_report,
    run_repeat,
    stop_ray,
    summarize,
)

log = logging.getLogger(__name__)

READY_S = 600.0
SKEW_STRENGTH = 4.0  # router logits added to the hot expert (make_tiny's router_bias)
SKEW_TARGET_TOKENS_S = 500.0  # autoscaling target per shard replica in the skewed scenario


# ---- transformers --------------------------------------------------------------------------------
class TransformersTarget:
    """`MixtralForCausalLM.generate` on static batches of `concurrency` requests (left padding)."""

    def __init__(self, model_dir: str, experts_implementation: str | None = None) -> None:
        import torch
        import transformers

        extra: dict[str, Any] = {}
        if experts_implementation:  # transformers 5 defaults to "grouped_mm"; "eager" is its loop
            extra["experts_implementation"] = experts_implementation
        self.model = transformers.MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                     **extra).eval()
        self._generate([Job([5, 6, 7, 8], 2)])  # warm-up

    def run_batch(self, jobs: Sequence[Job], concurrency: int, progress: bool) -> dict[str, Any]:
        from tqdm import tqdm

        records: list[RequestRecord] = []
        start = time.perf_counter()
        for i in tqdm(range(0, len(jobs), concurrency), desc=f"transformers c={concurrency}", leave=False,
                      disable=not progress):
            records += self._generate(jobs[i:i + concurrency])
        return {**summarize(records, start, time.perf_counter()), "step": None}

    def _generate(self, batch: Sequence[Job]) -> list[RequestRecord]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps: list[float] = []

        class Stamp(StoppingCriteria):  # type: ignore[misc]
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        width, new = max(len(j.prompt_ids) for j in batch), max(j.max_tokens for j in batch)
        ids = torch.tensor([[0] * (width - len(j.prompt_ids)) + j.prompt_ids for j in batch])  # [B, S]
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in batch])
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=0,
                                stopping_criteria=StoppingCriteriaList([Stamp()]))
        return [RequestRecord(len(j.prompt_ids), start, stamps[:j.max_tokens], j.max_tokens,
                              stamps[j.max_tokens - 1]) for j in batch]

    def close(self) -> None:
        del self.model
        gc.collect()


# ---- OpenAI HTTP ---------------------------------------------------------------------------------
class HttpTarget:
    """Streaming `/v1/completions` against `base_url` (no `/v1`), one chunk per token."""

    def __init__(self, base_url: str, logprobs: bool = True, model: str | None = None,
                 transport: Any = None) -> None:
        import httpx

        self.base_url, self.logprobs, self.transport = base_url.rstrip("/"), logprobs, transport
        self.model = model or httpx.get(f"{self.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
        self._client: Any = None
        self.has_status = True  # moray's /v1/moray/status; False once the server answers otherwise

    def client(self) -> Any:
        import httpx

        if self._client is None:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=30.0), limits=limits,
                                             transport=self.transport)
        return self._client

    async def stream(self, job: Job) -> AsyncIterator[int]:
        payload: dict[str, Any] = {"model": self.model, "prompt": job.prompt_ids,
                                   "max_tokens": job.max_tokens, "temperature": 0.0, "ignore_eos": True,
                                   "stream": True,
                                   "stream_options": {"include_usage": True}}
        if self.logprobs:
            payload["logprobs"] = 0
        counted = 0
        async with self.client().stream("POST", f"{self.base_url}/v1/completions", json=payload) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for chunk in _sse(r.aiter_lines()):
                for choice in chunk.get("choices") or []:
                    if choice.get("text") or choice.get("logprobs"):
                        counted += 1
                        yield 1
                done = (chunk.get("usage") or {}).get("completion_tokens", 0)
                if done > counted:
                    yield UsageCount(done - counted)
                    counted = done

    async def snapshot(self) -> dict[str, Any]:
        """moray's engine stats (`/v1/moray/status`), {} from other servers."""
        if not self.has_status:
            return {}
        r = await self.client().get(f"{self.base_url}/v1/moray/status")
        self.has_status = r.status_code == 200
        return dict(r.json().get("dispatcher") or {}) if self.has_status else {}

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def close(self) -> None:
        self._client = None


async def _sse(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"stream error: {chunk['error'].get('message')}")
        yield chunk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = READY_S) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


class ServeTarget(HttpTarget):
    """moray's Serve app (`deploy/app.py`) in this process's Ray, measured over HTTP."""

    def __init__(self, model_dir: str, num_shards: int, max_seqs: int, pingpong: bool, logprobs: bool,
                 **overrides: Any) -> None:
        from moray.deploy.app import run_app
        from moray.deploy.config import ServerConfig

        self.config = ServerConfig(model=model_dir, served_model_name="moray-bench", num_shards=num_shards,
                                   max_num_seqs=max(max_seqs, 1), max_waiting=256, api_key=None,
                                   pingpong=pingpong, port=free_port(), grpc_port=free_port(), **overrides)
        cfg = self.config
        replicas = cfg.shard_max_replicas if cfg.autoscaling else cfg.shard_min_replicas
        ensure_ray(self.config.dispatcher_cpus + num_shards * replicas * self.config.shard_cpus)
        run_app(self.config, proxy_location="HeadOnly")
        url = f"http://127.0.0.1:{self.config.port}"
        wait_ready(f"{url}/health")
        super().__init__(url, logprobs, "moray-bench")

    async def snapshot(self) -> dict[str, Any]:
        from ray import serve

        stats = await super().snapshot()
        handles = [serve.get_deployment_handle(f"expert-shard-{g}", self.config.app_name)
                   for g in range(self.config.num_shards)]
        infos = await asyncio.gather(*(h.info.remote() for h in handles))
        return {**stats, "shard_busy_s": [float(i["busy_s"]) for i in infos]}

    def replicas(self) -> dict[str, int]:
        from ray import serve

        app = serve.status().applications.get(self.config.app_name)
        return {name: sum(d.replica_states.values()) for name, d in (app.deployments.items() if app else [])}

    def close(self) -> None:
        from ray import serve

        super().close()
        serve.shutdown()


class VllmTarget(HttpTarget):
    """vLLM's OpenAI server (CPU build) on the same checkpoint, started from `python` and stopped after."""

    def __init__(self, python: str, model_dir: str, kv_gib: float, logprobs: bool) -> None:
        port = free_port()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(int(kv_gib) if kv_gib >= 1 else kv_gib)}
        self.log_path = Path(tempfile.mkstemp(prefix="moray-bench-vllm-", suffix=".log")[1])
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--tokenizer-mode",
               "mistral", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)]
        log.info("starting vLLM (log %s): %s", self.log_path, " ".join(cmd))
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_ready(f"http://127.0.0.1:{port}/v1/models", self.proc)
        except Exception:
            self.close()
            raise RuntimeError(f"vLLM did not start; see {self.log_path}") from None
        super().__init__(f"http://127.0.0.1:{port}", logprobs)

    def close(self) -> None:
        super().close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its workers
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# ---- bandwidth -----------------------------------------------------------------------------------
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


# ---- online, soak --------------------------------------------------------------------------------
def run_online(args: argparse.Namespace) -> dict[str, Any]:
    """Closed-loop load on a running server at each concurrency level."""
    facts = model_facts(args.model) if args.model else None
    report = new_report(args, facts)
    report["bandwidth"] = measure_bandwidth(args.bandwidth_gib) if facts else None
    target = HttpTarget(args.url, not args.no_logprobs)
    for c in args.concurrency:
        once = partial(run_repeat, target, args, c, f"{args.url}", facts)
        result = best_of(args.repeats, once, args.wait_quiet, args.wait_quiet_timeout)
        report["runs"].append({"system": f"server {target.model}", "concurrency": c, **result})
    finish_report(report, facts, {})
    return report


def ray_processes(url: str) -> Iterator[Any]:
    """The Ray workers (actors and Serve replicas, named `ray::...`) of the server at `url`: the
    process listening on its port, up to its raylet, and the raylet's descendants. Any `ray::` process
    on this machine when the listener is not found here."""
    import psutil

    port = urlparse(url).port or 80
    listener = next((c.pid for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid), None)
    scope: Any = None
    if listener is not None:
        scope = psutil.Process(listener)
        while scope.parent() is not None and "raylet" not in scope.name():
            scope = scope.parent()
    found = scope is not None and "raylet" in scope.name()
    candidates = scope.children(recursive=True) if found else psutil.process_iter()
    for p in candidates:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if cmd and cmd[0].startswith("ray::"):
            yield p


def sample_rss(samples: list[dict[str, Any]], t: float, url: str) -> None:
    import psutil

    for p in ray_processes(url):
        try:
            samples.append({"t": t, "pid": p.pid, "name": p.cmdline()[0], "rss": p.memory_info().rss})
        except psutil.Error:
            continue


def rss_growth(samples: Sequence[dict[str, Any]], warmup_s: float) -> list[dict[str, Any]]:
    """Per process: RSS at the first sample, after `warmup_s`, at the end, and the growth from each."""
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        by_pid.setdefault(s["pid"], []).append(s)
    out = []
    for pid, rows in sorted(by_pid.items()):
        first, last = rows[0], rows[-1]
        warm = next((r for r in rows if r["t"] >= warmup_s), first)
        out.append({"pid": pid, "name": first["name"], "samples": len(rows), "rss_first": first["rss"],
                    "rss_after_warmup": warm["rss"], "rss_last": last["rss"],
                    "rss_max": max(r["rss"] for r in rows),
                    "growth": last["rss"] / first["rss"] - 1.0,
                    "growth_after_warmup": last["rss"] / warm["rss"] - 1.0})
    return out


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    """`--soak MINUTES` of mixed load on `--url` at the highest concurrency; RSS of every Ray process."""
    report = new_report(args, None)
    target, concurrency = HttpTarget(args.url, not args.no_logprobs), max(args.concurrency)
    deadline, samples = time.monotonic() + 60.0 * args.soak, list[dict[str, Any]]()
    jobs = _endless_jobs(args, deadline)

    async def soak() -> dict[str, Any]:
        t0 = time.monotonic()

        async def sampler() -> None:
            while time.monotonic() < deadline:
                sample_rss(samples, time.monotonic() - t0, args.url)
                await asyncio.sleep(args.sample_interval)

        task = asyncio.create_task(sampler())
        records, start, end = await drive(target.stream, jobs, concurrency, "soak", not args.no_progress)
        task.cancel()
        sample_rss(samples, time.monotonic() - t0, args.url)
        await target.aclose()
        return {**summarize(records, start, end), "step": None}

    result = asyncio.run(soak())
    report["runs"].append({"system": f"soak {target.model}", "concurrency": concurrency, **result})
    processes = rss_growth(samples, warmup_s=min(60.0, 12.0 * args.soak))
    report["soak"] = {"minutes": args.soak, "interval_s": args.sample_interval, "processes": processes,
                      "samples": samples}
    worst = max((p["growth_after_warmup"] for p in processes), default=0.0)
    report["notes"] = [f"largest RSS growth after warm-up: {worst:+.1%} ({len(processes)} processes)"]
    finish_report(report, None, {})
    return report


def _endless_jobs(args: argparse.Namespace, deadline: float) -> Iterator[Job]:
    seed = args.seed
    while time.monotonic() < deadline:
        yield from make_jobs(1, args.prompt_len, args.output_len, args.vocab_size, seed)
        seed += 1


def soak_markdown(soak: dict[str, Any]) -> str:
    lines = ["| process | pid | samples | RSS first MB | after warm-up MB | last MB | max MB | growth "
             "| growth after warm-up |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in soak["processes"]:
        lines.append(f"| {p['name']} | {p['pid']} | {p['samples']} | {p['rss_first'] / 1e6:.0f} "
                     f"| {p['rss_after_warmup'] / 1e6:.0f} | {p['rss_last'] / 1e6:.0f} "
                     f"| {p['rss_max'] / 1e6:.0f} "
                     f"| {p['growth']:+.1%} | {p['growth_after_warmup']:+.1%} |")
    return "\n".join(lines) + "\n"


# ---- the skewed scenario (issue 6) ---------------------------------------------------------------
def skewed_model(args: argparse.Namespace) -> str:
    """A tiny checkpoint whose routers prefer expert 0 by SKEW_STRENGTH logits (made once, cached)."""
    from moray.model.tiny import TinySpec, cache_root, make_tiny

    if args.model:
        return str(args.model)
    root = Path(args.cache) if args.cache else cache_root()
    path = root / f"skewed-seed{args.seed}-e0x{SKEW_STRENGTH:g}"
    if not (path / "config.json").is_file():
        make_tiny(path, TinySpec(seed=args.seed), router_bias={0: SKEW_STRENGTH})
    return str(path)


def run_skewed(args: argparse.Namespace) -> dict[str, Any]:
    """Round-robin vs planned placement over actors, then Serve with autoscaling off / on / planned."""
    import numpy as np

    from moray.actors.placement import Placement, imbalance, plan_placement
    from moray.deploy.bench import engine_config

    model_dir, shards = skewed_model(args), args.num_shards or 2
    facts = model_facts(model_dir)
    report = new_report(args, facts)
    levels, n_jobs = args.concurrency, args.num_requests or 0
    ec, threads = engine_config(args, args.pingpong), args.threads or max(1, (os.cpu_count() or 1) // shards)
    local = LocalTarget(model_dir, ec)
    _run_levels(report, "moray-local (all experts)", local, args, facts, n_jobs)
    loads = np.stack([local.counter.loads[layer].numpy() for layer in sorted(local.counter.loads)])  # [L, E]
    local.close()
    planned = plan_placement(loads, num_gpus=shards, redundant=shards)
    rr = Placement.round_robin(facts["n_layers"], facts["n_experts"], shards)
    plan_file = Path(tempfile.mkstemp(prefix="moray-bench-placement-", suffix=".json")[1])
    planned.save(plan_file)
    report["placement"] = {"expert_share": (loads.sum(0) / loads.sum()).tolist(),
                           "imbalance_round_robin": imbalance(rr, loads),
                           "imbalance_planned": imbalance(planned, loads),
                           "planned_slots": planned.slots}
    ensure_ray(1.0 + 2 * shards * 0.5)
    scale = {"autoscaling": True, "shard_max_replicas": 2, "upscale_delay_s": 1.0,
             "target_tokens_per_replica_s": SKEW_TARGET_TOKENS_S}
    systems = [
        ("actors round-robin", lambda: ActorsTarget(model_dir, shards, ec, threads)),
        ("actors planned", lambda: ActorsTarget(model_dir, shards, ec, threads, placement=planned)),
        ("serve autoscaling off", lambda: ServeTarget(model_dir, shards, max(levels), args.pingpong, True)),
        ("serve autoscaling on", lambda: ServeTarget(model_dir, shards, max(levels), args.pingpong, True,
                                                     **scale)),
        ("serve planned", lambda: ServeTarget(model_dir, shards, max(levels), args.pingpong, True,
                                              placement=str(plan_file))),
    ]
    report["notes"] = []
    for name, factory in systems:
        target = factory()
        try:
            _run_levels(report, name, target, args, facts, n_jobs)
            if isinstance(target, ServeTarget):
                report["notes"].append(f"{name}: replicas at the end {target.replicas()}")
        finally:
            target.close()
    finish_report(report, facts, {})
    stop_ray()
    return report


def _run_levels(report: dict[str, Any], name: str, target: Any, args: argparse.Namespace,
                facts: dict[str, Any], n_jobs: int) -> None:
    for c in args.concurrency:
        once = partial(run_repeat, target, args, c, name, facts, default_n=n_jobs or 4 * c)
        result = best_of(args.repeats, once, args.wait_quiet, args.wait_quiet_timeout)
        report["runs"].append({"system": name, "concurrency": c, **result})
        log.info("bench: %s c=%d: %.1f output tok/s, ITL p99 %.1f ms", name, c, result["output_tokens_per_s"],
                 1e3 * (result["itl_s"]["p99"] or 0.0))


# ---- plots ---------------------------------------------------------------------------------------
def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """throughput.png and itl_p99.png (per system over concurrency), step_split.png (stacked ms/step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    systems = list(dict.fromkeys(r["system"] for r in report["runs"]))
    paths = []
    for key, label, fname in (("output_tokens_per_s", "output tokens/s", "throughput.png"),
                              ("itl_p99_ms", "ITL p99 (ms)", "itl_p99.png")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for s in systems:
            runs = [r for r in report["runs"] if r["system"] == s]
            ys = [r[key] if key in r else 1e3 * (r["itl_s"]["p99"] or 0.0) for r in runs]
            ax.plot([r["concurrency"] for r in runs], ys, marker="o", label=s)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="concurrency", ylabel=label)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / fname)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    paths.append(_plot_split(report, out_dir / "step_split.png", plt))
    return paths


def _plot_split(report: dict[str, Any], path: Path, plt: Any) -> Path:
    runs = [r for r in report["runs"] if r.get("step")]
    parts = ("attention", "router", "transport", "expert_compute", "sampling")
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(runs) + 2), 4))
    bottom = [0.0] * len(runs)
    for part in parts:
        ys = [r["step"]["ms_per_step"][part] or 0.0 for r in runs]
        ax.bar(range(len(runs)), ys, bottom=bottom, label=part)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_xticks(range(len(runs)), [f"{r['system']}\nc={r['concurrency']}" for r in runs], fontsize=6,
                  rotation=30)
    ax.set(ylabel="ms per engine step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
