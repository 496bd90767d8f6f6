"""`moray make-tiny` (a tiny random checkpoint) and `moray generate` (one prompt, in process or over
actors)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from moray.deploy.cli.common import fail, one_line


# ---- make-tiny ----------------------------------------------------------------------------------------
def add_make_tiny_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="output directory")
    for flag in ("layers", "dim", "heads", "kv-heads", "experts", "hidden", "seed"):
        p.add_argument(f"--{flag}", type=int, help=f"TinySpec.{flag.replace('-', '_')}")
    p.add_argument("--shards", type=int, default=1, help="safetensors files to split the weights over")


def run_make_tiny(args: argparse.Namespace) -> int:
    from moray.model.tiny import TinySpec, make_tiny

    fields = ("layers", "dim", "heads", "kv_heads", "experts", "hidden", "seed")
    try:
        spec = TinySpec(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})
    except (TypeError, ValueError) as e:
        return fail(f"bad tiny model spec: {one_line(e)}")
    make_tiny(args.dir, spec, shards=args.shards)
    return 0


# ---- generate -------------------------------------------------------------------------------------------
def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="text to complete")
    p.add_argument("--model", help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--num-shards", type=int, default=0, help="0: in this process; N: N expert-shard actors")
    p.add_argument("--transport", choices=["auto", "socket", "ray"], default="auto",
                   help="with --num-shards: the data plane (auto: shared memory on a node, TCP across; "
                        "socket: TCP) or a Ray actor call per layer (ray)")


def run_generate(args: argparse.Namespace) -> int:
    from moray.model.engine import EngineConfig, GenerateRequest
    from moray.model.sampling import SamplingParams
    from moray.model.tokenizer import Tokenizer

    path = args.model or _tiny_dir()
    tokenizer = Tokenizer.from_model_dir(path)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    request = GenerateRequest(tokenizer.encode(args.prompt, bos=True), params)
    engine_config = EngineConfig(max_num_seqs=1)
    if args.num_shards == 0:
        events = _local_stream(path, engine_config, request)
    else:
        events = _ray_stream(path, args.num_shards, args.transport, engine_config, request)
    asyncio.run(_print_stream(events))
    return 0


async def _print_stream(events: Any) -> None:
    async for event in events:
        sys.stdout.write(event.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


async def _local_stream(path: str, engine_config: Any, request: Any) -> Any:
    from moray.model.engine import AsyncEngine
    from moray.model.mixtral import load_local
    from moray.model.tokenizer import Tokenizer

    model, experts = load_local(path)
    engine = AsyncEngine(model, experts, Tokenizer.from_model_dir(path), engine_config)
    async for event in engine.generate(request):
        yield event


async def _ray_stream(path: str, num_shards: int, transport: Any, engine_config: Any, request: Any) -> Any:
    import ray

    from moray.actors.runtime import RuntimeOptions, start_runtime
    from moray.deploy.serve.network import ray_on_loopback

    ray_on_loopback()  # a local cluster for this one prompt: nothing for other machines to reach
    ray.init(address="local", log_to_driver=False)
    runtime = start_runtime(path, num_shards, engine_config, options=RuntimeOptions(transport=transport))
    try:
        async for event in runtime.stream(request):
            yield event
    finally:
        runtime.shutdown()
        ray.shutdown()


def _tiny_dir() -> str:
    from moray.model.tiny import default_model_dir

    return str(default_model_dir())
