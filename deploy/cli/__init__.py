"""`moray`: the command table and `main`; each command lives in its own module of this package.

Every command is a module with `add_arguments(parser)` and `run(args) -> int`, imported only when
its command runs, so a broken or missing module only breaks its own command (and `moray --help`
imports none of them).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass
from types import ModuleType

from moray.deploy.cli.common import fail, one_line


@dataclass(frozen=True)
class Command:
    """A command: the module holding `add_arguments(parser)` and `run(args) -> int`, and its help line."""

    module: str
    help: str
    add_arguments: str = "add_arguments"
    run: str = "run"


COMMANDS: dict[str, Command] = {
    "serve": Command("moray.deploy.cli.serve", "run the OpenAI/gRPC server in the foreground"),
    "make-tiny": Command("moray.deploy.cli.generate", "write a tiny random Mixtral checkpoint",
                         "add_make_tiny_arguments", "run_make_tiny"),
    "generate": Command("moray.deploy.cli.generate", "complete a prompt (in process, or over Ray actors)",
                        "add_generate_arguments", "run_generate"),
    "status": Command("moray.deploy.cli.status", "deployments, replicas, shard tokens/s, hottest experts"),
    "plan-placement": Command("moray.deploy.cli.plan_placement", "EPLB-style placement from recorded loads"),
    "rebalance": Command("moray.deploy.cli.rebalance", "move a running app's experts online by load"),
    "routing-report": Command("moray.deploy.cli.routing_report",
                              "router statistics and plots (Mixtral paper, sec. 5)"),
    "bench": Command("moray.deploy.bench.main", "benchmark throughput and latency (local, Ray or a server)"),
}


def load(name: str) -> ModuleType:
    """The module of command `name`, imported now (ImportError if it is missing)."""
    return importlib.import_module(COMMANDS[name].module)


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module (if any) is imported."""
    parser = argparse.ArgumentParser(prog="moray", description="Expert-parallel Mixtral server on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name == command:
            getattr(load(name), cmd.add_arguments)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="moray: %(message)s")
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command if command in COMMANDS else None)
    except (ImportError, AttributeError) as e:
        return fail(f"command {command!r} is unavailable: {one_line(e)}")
    args = parser.parse_args(argv)
    return int(getattr(load(args.command), COMMANDS[args.command].run)(args))
