"""`moray`: serve, make a tiny checkpoint, generate, and the commands other modules add.

Commands are a table: built-ins below, and `PLUGINS` naming a module (and its `add_arguments(parser)`
/ `run(args) -> int` functions) that is imported only when its command runs, so a broken or missing
module only breaks its own command.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("moray")

EXIT_USAGE = 2


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Plugin:
    """A command living in another module: `module.add_arguments(parser)` and `module.run(args) -> int`."""

    module: str
    help: str
    add_arguments: str = "add_arguments"
    run: str = "run"


PLUGINS: dict[str, Plugin] = {
    "bench": Plugin("moray.deploy.bench", "benchmark throughput and latency (local, Ray or a server)"),
    "status": Plugin("moray.deploy.balance", "replica counts and expert token rates of a running app",
                     "add_status_arguments", "run_status"),
    "plan-placement": Plugin("moray.deploy.balance", "EPLB-style placement from recorded loads"),
    "routing-report": Plugin("moray.deploy.routing", "router statistics and plots (Mixtral paper, sec. 5)"),
}


class StartupError(Exception):
    """A problem found before anything starts; printed as one line, exit code 2."""


def fail(message: str) -> int:
    """One line on stderr (whitespace, newlines included, collapsed), exit code 2."""
    sys.stderr.write(f"moray: error: {' '.join(message.split())}\n")
    return EXIT_USAGE


# ---- serve ------------------------------------------------------------------------------------------
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--config", help="YAML file of ServerConfig fields; flags override it")
    p.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 9000)")
    p.add_argument("--num-shards", type=int, help="expert shards (default 2)")
    p.add_argument("--placement", help="placement JSON from `moray plan-placement`")
    p.add_argument("--address", help="join this Ray cluster instead of starting one")
    p.add_argument("--autoscaling", action="store_true", default=None, help="scale replicas on token load")
    p.add_argument("--pingpong", action="store_true", default=None, help="two micro-batches in flight")
    p.add_argument("--max-num-seqs", type=int, help="most sequences per engine step")
    p.add_argument("--max-waiting", type=int, help="requests allowed to wait; beyond: HTTP 429")
    p.add_argument("--api-key", help="bearer token clients must send (default $MORAY_API_KEY)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the model runs")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--served-model-name", help="model id clients send")
    p.add_argument("--verbose", action="store_true", help="stream the replicas' logs to this console")


def serve_config(args: argparse.Namespace) -> Any:
    from moray.deploy.config import ServerConfig

    names = ("model", "host", "port", "grpc_port", "num_shards", "placement", "autoscaling", "pingpong",
             "max_num_seqs", "max_waiting", "api_key", "device", "dtype", "served_model_name")
    return ServerConfig.load(args.config, {n: getattr(args, n) for n in names})


def check_startup(config: Any, local: bool) -> tuple[str, Any]:
    """Everything that can be checked before Ray starts: the checkpoint, the placement, GPUs, ports."""
    from moray.deploy.app import model_dir, placement
    from moray.model.config import MixtralConfig
    from moray.model.tokenizer import Tokenizer

    path = model_dir(config)
    try:
        model = MixtralConfig.load(path)
        Tokenizer.from_model_dir(path)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same one-line error
        raise StartupError(f"cannot load checkpoint {path}: {_one_line(e)}") from None
    if not any(Path(path).glob("*.safetensors")):
        raise StartupError(f"cannot load checkpoint {path}: no *.safetensors file")
    try:
        plan = placement(config, model)
    except (ValueError, OSError) as e:
        raise StartupError(f"placement: {_one_line(e)}") from None
    if local and config.resolved_device() == "cuda":
        import torch

        need = plan.num_shards * config.shard_min_replicas + config.dispatcher_replicas
        have = torch.cuda.device_count()
        if need > have:
            raise StartupError(f"{plan.num_shards} shards and {config.dispatcher_replicas} dispatcher(s) "
                               f"need {need} GPUs, this machine has {have}")
    for host, port, what in ((config.host, config.port, "HTTP"), ("0.0.0.0", config.grpc_port, "gRPC")):
        check_port(host, port, what)
    return path, plan


def check_port(host: str, port: int, what: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise StartupError(f"{what} port {port} on {host} is not free ({e.strerror})") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def local_cpus(config: Any, num_shards: int) -> int:
    """Logical CPUs for a local Ray: every actor's reservation at its largest replica count, or the cores.
    `num_shards`: the placement's (a `--placement` file sets it, not `--num-shards`)."""
    per_shard = config.shard_max_replicas if config.autoscaling else config.shard_min_replicas
    shards = num_shards * per_shard
    dispatchers = config.dispatcher_max_replicas if config.autoscaling else config.dispatcher_replicas
    need = shards * config.shard_cpus + dispatchers * config.dispatcher_cpus
    return max(os.cpu_count() or 1, int(need + 0.999))


def run_serve(args: argparse.Namespace) -> int:
    import ray

    from moray.deploy.config import ConfigError

    try:
        config = serve_config(args)
        path, plan = check_startup(config, local=args.address is None)
    except (ConfigError, StartupError) as e:
        return fail(str(e))
    stop = _stop_event()
    cpus = None if args.address else local_cpus(config, plan.num_shards)
    ray.init(address=args.address or "local", num_cpus=cpus,
             log_to_driver=args.verbose, namespace="serve", ignore_reinit_error=True)
    try:
        from moray.deploy.app import run_app

        log.info("model %s (%s), %d expert shards, device %s", config.served_model_name, path,
                 plan.num_shards, config.resolved_device())
        run_app(config)
        log.info("ready: http://%s:%d/v1 (OpenAI API), gRPC on port %d; Ctrl-C stops", config.host,
                 config.port, config.grpc_port)
        stop.wait()
        log.info("shutting down")
        return 0
    except Exception as e:  # noqa: BLE001 - a deploy failure is one line, the details are in Ray's logs
        return fail(f"the app failed to start: {_one_line(e)}")
    finally:
        _shutdown(config, joined=args.address is not None)


def _stop_event() -> threading.Event:
    """Set on the first SIGINT/SIGTERM; a second one exits at once."""
    stop = threading.Event()

    def handler(signum: int, _: Any) -> None:
        if stop.is_set():
            os._exit(130)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop


def _shutdown(config: Any, joined: bool) -> None:
    import ray
    from ray import serve

    try:
        if joined:
            serve.delete(config.app_name)
        else:
            serve.shutdown()
    except Exception as e:  # noqa: BLE001 - shutting down what may be half started
        log.warning("serve shutdown: %s", _one_line(e))
    ray.shutdown()


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
        return fail(f"bad tiny model spec: {_one_line(e)}")
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


def run_generate(args: argparse.Namespace) -> int:
    from moray.model.engine import EngineConfig, GenerateRequest
    from moray.model.sampling import SamplingParams
    from moray.model.tokenizer import Tokenizer

    path = args.model or _tiny_dir()
    tokenizer = Tokenizer.from_model_dir(path)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    request = GenerateRequest(tokenizer.encode(args.prompt, bos=True), params)
    engine_config = EngineConfig(max_num_seqs=1)
    stream = _local_stream if args.num_shards == 0 else _ray_stream
    asyncio.run(_print_stream(stream(path, args.num_shards, engine_config, request)))
    return 0


async def _print_stream(events: Any) -> None:
    async for event in events:
        sys.stdout.write(event.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


async def _local_stream(path: str, _: int, engine_config: Any, request: Any) -> Any:
    from moray.model.engine import AsyncEngine
    from moray.model.mixtral import load_local
    from moray.model.tokenizer import Tokenizer

    model, experts = load_local(path)
    engine = AsyncEngine(model, experts, Tokenizer.from_model_dir(path), engine_config)
    async for event in engine.generate(request):
        yield event


async def _ray_stream(path: str, num_shards: int, engine_config: Any, request: Any) -> Any:
    import ray

    from moray.actors.runtime import start_runtime

    ray.init(address="local", log_to_driver=False)
    runtime = start_runtime(path, num_shards, engine_config)
    try:
        async for event in runtime.stream(request):
            yield event
    finally:
        runtime.shutdown()
        ray.shutdown()


def _tiny_dir() -> str:
    from moray.model.tiny import default_model_dir

    return str(default_model_dir())


# ---- the table and main -----------------------------------------------------------------------------------
COMMANDS: dict[str, Command] = {
    "serve": Command("run the OpenAI/gRPC server in the foreground", add_serve_arguments, run_serve),
    "make-tiny": Command("write a tiny random Mixtral checkpoint", add_make_tiny_arguments, run_make_tiny),
    "generate": Command("complete a prompt (in process, or over Ray actors)", add_generate_arguments,
                        run_generate),
}


def resolve(name: str) -> Command:
    """A built-in command, or a plugin's module imported now (ImportError if it is missing)."""
    if name in COMMANDS:
        return COMMANDS[name]
    plugin = PLUGINS[name]
    module = importlib.import_module(plugin.module)
    return Command(plugin.help, getattr(module, plugin.add_arguments), getattr(module, plugin.run))


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only `command`'s plugin module (if any) is imported."""
    parser = argparse.ArgumentParser(prog="moray", description="Expert-parallel Mixtral server on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in [*COMMANDS, *PLUGINS]:
        help_text = COMMANDS[name].help if name in COMMANDS else PLUGINS[name].help
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            resolve(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="moray: %(message)s")
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command if command in {*COMMANDS, *PLUGINS} else None)
    except (ImportError, AttributeError) as e:
        return fail(f"command {command!r} is unavailable: {_one_line(e)}")
    args = parser.parse_args(argv)
    return resolve(args.command).run(args)


if __name__ == "__main__":
    sys.exit(main())
