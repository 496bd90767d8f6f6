"""Expert load balance from the command line: `moray plan-placement` and `moray status`.

    moray status --stats-out loads.json          # a running app's replicas and token counts
    moray plan-placement --stats loads.json --gpus 4 --redundant 4 --out placement.json
    moray serve --placement placement.json       # shards as planned

`moray status` joins the running cluster as a second Ray driver (like `moray.connect`, see
`moray.deploy.client` for token authentication), reads each deployment's state and replica counts
from `serve.status()`, and asks every expert-shard replica for its `load_report()` (through the
replica actor's `record_routing_stats`, the same report Serve's request routers get). It prints
JSON; `--stats-out` writes the per-(layer, expert) token counts, summed over replicas, in
`save_stats` format for `plan-placement`. Counts are since each replica started: a replica that
was scaled away takes its counts with it.

Letters: L layers, E experts, G shards (GPUs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EXIT_USAGE = 2
SHARD_PREFIX = "expert-shard-"
REPLICA_PREFIX = "SERVE_REPLICA::"  # Serve's replica actor names: SERVE_REPLICA::app#deployment#id
SERVE_NAMESPACE = "serve"


def _fail(message: str) -> int:
    sys.stderr.write(f"moray: error: {' '.join(message.split())}\n")
    return EXIT_USAGE


# ---- plan-placement -----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """`moray plan-placement` flags."""
    p.add_argument("--stats", required=True,
                   help="token counts per (layer, expert), e.g. from `moray status --stats-out`")
    p.add_argument("--gpus", type=int, required=True, help="expert shards (GPUs) to plan for")
    p.add_argument("--redundant", type=int, default=0, help="extra expert copies per layer (default 0)")
    p.add_argument("--slots-per-gpu", type=int, help="expert slots per GPU (default ceil((E + R) / G))")
    p.add_argument("--out", default="placement.json", help="placement file to write (default placement.json)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")


def run(args: argparse.Namespace) -> int:
    """Plan, write the placement, print max/mean load per GPU before (round-robin) and after."""
    from moray.actors.placement import PlacementError, load_stats, plan_placement, plan_report

    try:
        loads = load_stats(args.stats)  # [L, E]
        after = plan_placement(loads, args.gpus, args.redundant, args.slots_per_gpu)
    except (OSError, ValueError, KeyError) as e:  # PlacementError is a ValueError
        kind = "placement" if isinstance(e, PlacementError) else f"stats file {args.stats}"
        return _fail(f"{kind}: {_one_line(e)}")
    before = _round_robin(loads.shape, args.gpus)
    after.save(args.out)
    report = plan_report(before or after, after, loads)
    if before is None:
        report["before"] = None
    report["placement"] = str(args.out)
    sys.stdout.write(json.dumps(report) + "\n" if args.json else format_report(report))
    return 0


def _round_robin(shape: tuple[int, ...], gpus: int) -> Any:
    """The default placement over `gpus` shards, None when there are more GPUs than experts."""
    from moray.actors.placement import Placement

    layers, experts = shape
    return Placement.round_robin(layers, experts, gpus) if gpus <= experts else None


def format_report(report: Mapping[str, Any]) -> str:
    """A table: per layer, max and mean load per GPU and max/mean, round-robin vs planned."""
    before, after = report["before"], report["after"]
    lines = [f"{'layer':>5}  {'before max/mean':>22}  {'ratio':>6}  {'after max/mean':>22}  {'ratio':>6}"]
    for layer in range(len(after["max_gpu_load"])):
        old = _cells(before, layer) if before else f"{'-':>22}  {'-':>6}"
        lines.append(f"{layer:>5}  {old}  {_cells(after, layer)}")
    summary = (f"max/mean load per GPU (mean over layers): before {before['imbalance_mean']:.3f}, "
               if before else "max/mean load per GPU (mean over layers): before -, ")
    lines.append(summary + f"after {after['imbalance_mean']:.3f} (worst layer {after['imbalance_max']:.3f})")
    lines.append(f"wrote {report['placement']} ({after['num_shards']} shards; expert slots per GPU, "
                 f"all layers: {after['slots_per_gpu']}): moray serve --placement {report['placement']}")
    return "\n".join(lines) + "\n"


def _cells(side: Mapping[str, Any], layer: int) -> str:
    hi, mean = side["max_gpu_load"][layer], side["mean_gpu_load"][layer]
    ratio = hi / mean if mean > 0 else 1.0
    return f"{hi:>10.1f} / {mean:>9.1f}  {ratio:>6.3f}"


# ---- status ---------------------------------------------------------------------------------------------
def add_status_arguments(p: argparse.ArgumentParser) -> None:
    """`moray status` flags."""
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else auto)")
    p.add_argument("--app", default="moray", help="Serve application name (default moray)")
    p.add_argument("--auth-token", help="the cluster's Ray auth token (see moray.deploy.client)")
    p.add_argument("--stats-out", help="also write token counts per (layer, expert) for plan-placement")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the replicas' reports")


def run_status(args: argparse.Namespace) -> int:
    """Print the app's status as JSON (and write `--stats-out`)."""
    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        _connect(address, args.auth_token)
        status = app_status(args.app, args.timeout)
    except (ConnectionError, LookupError, TimeoutError) as e:
        return _fail(_one_line(e))
    if args.stats_out:
        if status["experts"] is None:
            return _fail(f"app {args.app!r}: no expert shard reported any load yet")
        write_stats(args.stats_out, status)
    sys.stdout.write(json.dumps(status, indent=2) + "\n")
    return 0


def _connect(address: str, auth_token: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if auth_token:
        from moray.deploy.client import AUTH_MODE_ENV, AUTH_TOKEN_ENV

        os.environ[AUTH_MODE_ENV], os.environ[AUTH_TOKEN_ENV] = "token", auth_token
    ray.init(address=address, namespace=SERVE_NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)


def app_status(app: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """{"app", "status", "deployments": {name: {status, replicas, num_replicas}}, "shards": {name:
    {"tokens_per_s", "replicas": [load reports]}}, "experts": {"tokens" [L][E], "tokens_per_s" [L][E]}}.
    Needs a Ray connection; raises LookupError when `app` is not running."""
    from ray import serve

    apps = serve.status().applications
    if app not in apps:
        raise LookupError(f"no Serve application {app!r} (running: {sorted(apps) or 'none'})")
    state = apps[app]
    deployments = {name: _deployment_status(d) for name, d in sorted(state.deployments.items())}
    shards = {name: shard_reports(app, name, timeout_s) for name in deployments
              if name.startswith(SHARD_PREFIX)}
    return {"app": app, "status": _value(state.status), "deployments": deployments,
            "shards": {name: {"tokens_per_s": sum(r["tokens_per_s"] for r in reports), "replicas": reports}
                       for name, reports in shards.items()},
            "experts": expert_tables(r for reports in shards.values() for r in reports)}


def _deployment_status(d: Any) -> dict[str, Any]:
    replicas = {_value(k): int(v) for k, v in d.replica_states.items()}
    return {"status": _value(d.status), "replicas": replicas, "num_replicas": replicas.get("RUNNING", 0)}


def _value(x: Any) -> str:
    return str(getattr(x, "value", x))


def replica_actor_names(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of one deployment (Serve's `SERVE_REPLICA::app#dep#id`)."""
    import ray

    prefix = f"{REPLICA_PREFIX}{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == SERVE_NAMESPACE and a["name"].startswith(prefix))


def shard_reports(app: str, deployment: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """`load_report()` of every replica of one expert-shard deployment (replicas that do not answer in
    time, e.g. still starting or stopping, are left out)."""
    import ray

    refs: dict[str, Any] = {}
    for name in replica_actor_names(app, deployment):
        try:
            refs[name] = ray.get_actor(name, namespace=SERVE_NAMESPACE).record_routing_stats.remote()
        except ValueError:  # gone since listed
            continue
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    reports = []
    for ref in ready:
        try:
            report = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - a replica starting up or shutting down
            log.debug("replica report failed: %s", e)
            continue
        if report:
            reports.append(report)
    return sorted(reports, key=lambda r: str(r.get("replica")))


def expert_tables(reports: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Sum replicas' sparse reports into {"tokens": [L][E] counts, "tokens_per_s": [L][E] rates}."""
    reports = list(reports)
    if not reports:
        return None
    shape = (int(reports[0]["num_layers"]), int(reports[0]["num_experts"]))
    tokens, rates = np.zeros(shape, dtype=np.int64), np.zeros(shape)  # [L, E]
    for r in reports:
        for layer, expert, n in r["tokens"]:
            tokens[layer, expert] += n
        for layer, expert, rate in r["rates"]:
            rates[layer, expert] += rate
    return {"num_layers": shape[0], "num_experts": shape[1], "tokens": tokens.tolist(),
            "tokens_per_s": rates.round(3).tolist()}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def write_stats(path: str | Path, status: Mapping[str, Any]) -> None:
    """The token counts of an `app_status` result as a `save_stats` file."""
    from moray.actors.placement import save_stats

    save_stats(path, np.asarray(status["experts"]["tokens"]))
