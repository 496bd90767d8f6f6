"""`moray status`: a running app's deployments, replicas, per-shard tokens/s and hottest experts.

    moray status                      # tables, as `ray status` or `kubectl get` print them
    moray status --json               # the same, in full, for scripts
    moray status --stats-out loads.json   # also the token counts for `moray plan-placement`

It also prints the expert balance: mean ÷ max tokens per shard (per layer and overall) over the
replicas' window, and the placement version the replicas hold (see `moray rebalance`).

It joins the running cluster as a second Ray driver (like `moray.connect`; see
`moray.deploy.api.client` on token authentication) and reads Serve's state through
`moray.deploy.serve.state.app_status`: each deployment's state and replica counts, and every
expert-shard replica's `load_report()`. Token counts are since each replica started: a replica
that was scaled away takes its counts with it. Rates are over the replicas' last 10 s.

Letters: L layers, E experts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moray.actors.placement import save_stats
from moray.deploy.cli.common import connect_ray, fail, one_line
from moray.deploy.serve.rebalancer import balance_report
from moray.deploy.serve.state import app_status


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`moray status` flags."""
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else auto)")
    p.add_argument("--app", default="moray", help="Serve application name (default moray)")
    p.add_argument("--auth-token", help="the cluster's Ray auth token (see moray.deploy.api.client)")
    p.add_argument("--json", action="store_true", help="print everything as JSON (for scripts)")
    p.add_argument("--top", type=int, default=5, help="hottest experts to list (default 5)")
    p.add_argument("--stats-out", help="also write token counts per (layer, expert) for plan-placement")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the replicas' reports")


def run(args: argparse.Namespace) -> int:
    """Print the app's status as tables (or JSON) and write `--stats-out`."""
    try:
        connect_ray(args.address, args.auth_token)
        status = app_status(args.app, args.timeout)
    except (ConnectionError, LookupError, TimeoutError) as e:
        return fail(one_line(e))
    status["balance"] = balance_report(r for s in status["shards"].values() for r in s["replicas"])
    if args.stats_out:
        if status["experts"] is None:
            return fail(f"app {args.app!r}: no expert shard reported any load yet")
        write_stats(args.stats_out, status)
    sys.stdout.write(json.dumps(status, indent=2) + "\n" if args.json else format_status(status, args.top))
    return 0


def write_stats(path: str | Path, status: Mapping[str, Any]) -> None:
    """The token counts of an `app_status` result as a `save_stats` file."""
    save_stats(path, np.asarray(status["experts"]["tokens"]))


# ---- tables ---------------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned columns, two spaces apart; numbers as given (format them before)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def format_status(status: Mapping[str, Any], top: int = 5) -> str:
    """The deployments, the expert shards' load and the hottest experts, as three tables."""
    lines = [f"app {status['app']}: {status['status']}", ""]
    lines += table(["DEPLOYMENT", "STATUS", "RUNNING", "REPLICAS BY STATE"],
                   [[name, d["status"], d["num_replicas"], _states(d["replicas"])]
                    for name, d in status["deployments"].items()])
    lines += ["", *table(["SHARD", "REPLICAS", "TOKENS/S", "TOKENS", "EXPERT MB PER REPLICA"],
                         _shard_rows(status["shards"]))]
    lines += _balance_lines(status.get("balance"))
    experts = status.get("experts")
    if experts is None or not np.asarray(experts["tokens"]).any():
        lines += ["", "no expert has served a token yet"]
    else:
        lines += ["", f"hottest experts (of {experts['num_layers']} layers x {experts['num_experts']}):",
                  *table(["LAYER", "EXPERT", "TOKENS/S", "TOKENS", "SHARE OF LAYER"], hottest(experts, top))]
    return "\n".join(lines) + "\n"


def _balance_lines(balance: Mapping[str, Any] | None) -> list[str]:
    """Balancedness (mean / max tokens per shard) overall and per layer, and the placement in force."""
    if not balance:
        return []
    layers = " ".join(f"{b:.2f}" for b in balance["layers"])
    return ["", f"expert balance (mean / max {balance['by']} per shard): overall {balance['overall']:.3f}, "
                f"per layer {layers}; placement {'/'.join(balance['placement'])}"]


def _states(replicas: Mapping[str, int]) -> str:
    return " ".join(f"{state}={n}" for state, n in sorted(replicas.items())) or "-"


def _shard_rows(shards: Mapping[str, Any]) -> list[list[object]]:
    return [[name, len(s["replicas"]), f"{s['tokens_per_s']:.1f}",
             sum(int(r["tokens_total"]) for r in s["replicas"]), replica_megabytes(s["replicas"])]
            for name, s in shards.items()]


def replica_megabytes(replicas: Sequence[Mapping[str, Any]]) -> str:
    """Each replica's resident expert weights as it reports them (int8 ones counted as int8), in MB."""
    return " ".join(f"{int(r.get('param_bytes', 0)) / 1e6:.1f}" for r in replicas) or "-"


def hottest(experts: Mapping[str, Any], top: int) -> list[list[object]]:
    """The `top` (layer, expert) pairs by tokens/s (by tokens when nothing ran lately), with their
    share of their layer's tokens."""
    tokens = np.asarray(experts["tokens"], dtype=np.int64)  # [L, E]
    rates = np.asarray(experts["tokens_per_s"], dtype=float)  # [L, E]
    key = rates if rates.any() else tokens.astype(float)
    order = np.argsort(-key, axis=None, kind="stable")[:max(top, 0)]
    totals = tokens.sum(axis=1)  # [L]
    rows: list[list[object]] = []
    for flat in order:
        layer, expert = np.unravel_index(flat, tokens.shape)
        share = tokens[layer, expert] / totals[layer] if totals[layer] else 0.0
        rows.append([int(layer), int(expert), f"{rates[layer, expert]:.1f}", int(tokens[layer, expert]),
                     f"{100 * share:.1f}%"])
    return rows
