"""`moray rebalance`: re-place a running app's experts online, from the load its shards report.

    moray rebalance --dry-run         # what would move, and the balancedness before and after
    moray rebalance                   # move, if the plan gains at least the margin
    moray rebalance --redundant 2 --margin 0.1 --json

It joins the cluster as a second Ray driver (like `moray status`) and asks one dispatcher replica to run
the coordinator (`AppRebalancer.once`, `actors/rebalance.py`): plan from the shard replicas' token
windows, load what each shard gains while it serves, switch every dispatcher between two steps, free
what the shards lost. A move that fails anywhere is abandoned whole; the reason is printed and the
exit code is 1. `moray serve --rebalance-interval S` runs the same thing every S seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from moray.deploy.cli.common import connect_ray, fail, one_line
from moray.deploy.serve.state import DISPATCHER

OK = ("applied", "skipped", "dry-run")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`moray rebalance` flags."""
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else auto)")
    p.add_argument("--app", default="moray", help="Serve application name (default moray)")
    p.add_argument("--auth-token", help="the cluster's Ray auth token (see moray.deploy.api.client)")
    p.add_argument("--dry-run", action="store_true", help="plan and report, move nothing")
    p.add_argument("--redundant", type=int, help="extra expert copies per layer (default: the app's config)")
    p.add_argument("--margin", type=float, help="least balancedness gain to move (default: the app's config)")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the move")


def run(args: argparse.Namespace) -> int:
    """Ask a dispatcher replica of `--app` to rebalance; print the outcome; 0 unless the move failed."""
    try:
        connect_ray(args.address, args.auth_token)
        result = request(args.app, args.dry_run, args.redundant, args.margin, args.timeout)
    except Exception as e:  # noqa: BLE001 - no cluster, no app, an old app without a board: one line
        return fail(one_line(e))
    sys.stdout.write(json.dumps(result, indent=2) + "\n" if args.json else describe(result))
    return 0 if result["outcome"] in OK else 1


def request(app: str, dry_run: bool, redundant: int | None, margin: float | None,
            timeout_s: float) -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle(DISPATCHER, app)
    result: dict[str, Any] = handle.rebalance.remote(dry_run, redundant, margin).result(timeout_s=timeout_s)
    return result


def describe(result: Mapping[str, Any]) -> str:
    """The outcome, balancedness before/after (per layer too) and the (layer, expert) pairs that move."""
    lines = [f"rebalance {result['outcome']}: placement v{result['version']} in force "
             f"({result['seconds']:.1f} s)", f"  {result['reason']}"]
    if "balancedness_before" in result:
        pairs = zip(result["layers_before"], result["layers_after"], strict=True)
        layers = ", ".join(f"{a:.2f}->{b:.2f}" for a, b in pairs)
        before, after = result["balancedness_before"], result["balancedness_after"]
        lines.append(f"  balancedness {before:.3f} -> {after:.3f} (mean / max tokens per shard; per layer: "
                     f"{layers})")
        for layer, expert, before, after in result.get("moved", []):
            lines.append(f"  layer {layer} expert {expert}: shards {before} -> {after}")
    return "\n".join(lines) + "\n"
