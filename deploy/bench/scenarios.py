"""`moray bench` against a running server (`--url`), its soak (`--soak`: RSS of every Ray process every
`--sample-interval` s) and the skewed-router scenario (`--scenario skewed`: round-robin against planned
placement over actors, then Serve with autoscaling off, on, with the planned placement, with online
re-placement after a warm-up, and with autoscaling and periodic re-placement together; `--systems`
picks a subset by name).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from moray.deploy.bench.http import HttpTarget, ServeTarget
from moray.deploy.bench.measure import best_of, measure_bandwidth, model_facts, run_repeat
from moray.deploy.bench.report import finish_report, new_report
from moray.deploy.bench.targets import ActorsTarget, LocalTarget, engine_config, ensure_ray, stop_ray
from moray.deploy.bench.workload import Job, drive, make_jobs, summarize

log = logging.getLogger(__name__)


SKEW_STRENGTH = 4.0  # router logits added to the hot expert (make_tiny's router_bias)


SKEW_TARGET_TOKENS_S = 500.0  # autoscaling target per shard replica in the skewed scenario
REBALANCE_INTERVAL_S = 10.0  # periodic re-placement in "serve autoscaling + re-placement"
WARMUP_REPEAT = 999  # the warm-up's prompts are those of this repeat index (measured runs use 0, 1, ...)


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
        ("serve re-placement", lambda: ServeTarget(model_dir, shards, max(levels), args.pingpong, True,
                                                   redundant_experts=shards)),
        ("serve autoscaling + re-placement", lambda: ServeTarget(
            model_dir, shards, max(levels), args.pingpong, True, redundant_experts=shards,
            rebalance_interval_s=REBALANCE_INTERVAL_S, **scale)),
    ]
    wanted = {n.strip() for n in args.systems.split(",")} if args.systems else None
    report["notes"], report["rebalance"] = [], {}
    for name, factory in [(n, f) for n, f in systems if wanted is None or n in wanted]:
        target = factory()
        try:
            if name.endswith("re-placement"):
                report["rebalance"][name] = _warm_and_move(target, args, facts, max(levels))
            _run_levels(report, name, target, args, facts, n_jobs)
            if isinstance(target, ServeTarget):
                report["notes"].append(f"{name}: replicas at the end {target.replicas()}; "
                                       f"{_balance_note(target)}")
        finally:
            target.close()
    finish_report(report, facts, {})
    stop_ray()
    return report


def _warm_and_move(target: Any, args: argparse.Namespace, facts: dict[str, Any], c: int) -> dict[str, Any]:
    """One warm-up run (it fills the shards' token windows), then one online re-placement, as `moray
    rebalance` asks for it; the move's outcome, balancedness before/after and time."""
    from ray import serve

    from moray.deploy.serve.state import DISPATCHER

    run_repeat(target, args, c, "warm-up", facts, WARMUP_REPEAT, default_n=4 * c)  # its own prompts: no
    # prefix-cache hits in the measured runs
    handle = serve.get_deployment_handle(DISPATCHER, target.config.app_name)
    move: dict[str, Any] = handle.rebalance.remote().result(timeout_s=600)
    log.info("bench: re-placement %s in %.1f s: %s", move["outcome"], move["seconds"], move["reason"])
    keep = ("outcome", "cause", "reason", "version", "seconds", "phases", "balancedness_before",
            "balancedness_after", "layers_before", "layers_after")
    return {**{k: move.get(k) for k in keep}, "moved": len(move.get("moved", []))}


def _balance_note(target: Any) -> str:
    """Balancedness (mean / max tokens per shard) over the shards' window, from their own reports."""
    from moray.deploy.serve.rebalancer import balance_report, shard_reports

    balance = balance_report(shard_reports(target.config.app_name))
    if balance is None:
        return "no shard load reported"
    layers = ", ".join(f"{b:.2f}" for b in balance["layers"])
    return (f"balancedness at the end {balance['overall']:.3f} (per layer {layers}; by {balance['by']}), "
            f"placement {'/'.join(balance['placement'])}")


def _run_levels(report: dict[str, Any], name: str, target: Any, args: argparse.Namespace,
                facts: dict[str, Any], n_jobs: int) -> None:
    for c in args.concurrency:
        once = partial(run_repeat, target, args, c, name, facts, default_n=n_jobs or 4 * c)
        result = best_of(args.repeats, once, args.wait_quiet, args.wait_quiet_timeout)
        report["runs"].append({"system": name, "concurrency": c, **result})
        log.info("bench: %s c=%d: %.1f output tok/s, ITL p99 %.1f ms", name, c, result["output_tokens_per_s"],
                 1e3 * (result["itl_s"]["p99"] or 0.0))
