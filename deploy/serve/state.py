"""The one reader of Serve's state: deployment names, states and replica counts, shard load reports.

Everything that asks Serve what is running goes through here: the ingress's `/health`,
`/v1/moray/status` and `/v1/moray/routing`, the dispatcher's replica refresh, `moray status` and
the benchmark. Deployment names are spelled here once (`shard_name`, `DISPATCHER`, `INGRESS`).

Every function needs a Ray connection (a replica's own, or a driver's) and blocks on a controller
call, except `shard_token_counts` (async, through deployment handles). Letters: L layers, E experts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SHARD_PREFIX = "expert-shard-"
DISPATCHER = "dispatcher"
INGRESS = "openai-ingress"
REPLICA_PREFIX = "SERVE_REPLICA::"  # Serve's replica actor names: SERVE_REPLICA::app#deployment#id
SERVE_NAMESPACE = "serve"
LIVE_STATUSES = ("HEALTHY", "UPSCALING", "DOWNSCALING")


def shard_name(shard: int) -> str:
    """The Serve deployment name of expert shard `shard`."""
    return f"{SHARD_PREFIX}{shard}"


def _value(x: Any) -> str:
    return str(getattr(x, "value", x))


def _applications() -> dict[str, Any]:
    """Serve's status of every application: the only `serve.status()` call in moray."""
    from ray import serve

    return dict(serve.status().applications)


def _deployment_status(d: Any) -> dict[str, Any]:
    replicas = {_value(k): int(v) for k, v in d.replica_states.items()}
    return {"status": _value(d.status), "replicas": replicas, "num_replicas": replicas.get("RUNNING", 0)}


def deployment_states(app: str) -> dict[str, dict[str, Any]]:
    """{deployment: {"status", "replicas": {state: n}, "num_replicas": running}}; {} when `app` is absent."""
    state = _applications().get(app)
    return {name: _deployment_status(d) for name, d in sorted(state.deployments.items())} if state else {}


def running_replicas(app: str, shards: int) -> list[int]:
    """Running replicas of expert shards 0..shards-1 of `app` (0 for a shard Serve does not list)."""
    states = deployment_states(app)
    return [states.get(shard_name(s), {}).get("num_replicas", 0) for s in range(shards)]


def app_status(app: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """{"app", "status", "deployments": {name: deployment status}, "shards": {name: {"tokens_per_s",
    "replicas": [load reports]}}, "experts": {"tokens" [L][E], "tokens_per_s" [L][E]} or None}.
    Raises LookupError when `app` is not running."""
    apps = _applications()
    if app not in apps:
        raise LookupError(f"no Serve application {app!r} (running: {sorted(apps) or 'none'})")
    deployments = {name: _deployment_status(d) for name, d in sorted(apps[app].deployments.items())}
    shards = {name: shard_reports(app, name, timeout_s)
              for name in deployments if name.startswith(SHARD_PREFIX)}
    return {"app": app, "status": _value(apps[app].status), "deployments": deployments,
            "shards": {name: {"tokens_per_s": sum(r["tokens_per_s"] for r in reports), "replicas": reports}
                       for name, reports in shards.items()},
            "experts": expert_tables(r for reports in shards.values() for r in reports)}


def replica_actor_names(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of one deployment (Serve's `SERVE_REPLICA::app#dep#id`)."""
    import ray

    prefix = f"{REPLICA_PREFIX}{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == SERVE_NAMESPACE and a["name"].startswith(prefix))


def shard_reports(app: str, deployment: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """`load_report()` of every replica of one expert-shard deployment, through the replica actor's
    `record_routing_stats` (replicas that do not answer in time, starting or stopping, are left out)."""
    import ray

    refs: list[Any] = []
    for name in replica_actor_names(app, deployment):
        try:
            refs.append(ray.get_actor(name, namespace=SERVE_NAMESPACE).record_routing_stats.remote())
        except ValueError:  # gone since listed
            continue
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
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


async def shard_token_counts(app: str) -> tuple[list[list[int]], int]:
    """Tokens served per [layer][expert], summed over the app's expert-shard deployments (one
    `token_counts()` handle call each, so one replica each), and how many shards answered.
    Raises LookupError when the app has no expert-shard deployment."""
    from ray import serve

    states = await asyncio.to_thread(deployment_states, app)
    names = [n for n in states if n.startswith(SHARD_PREFIX)]
    shards = [serve.get_deployment_handle(n, app) for n in names]
    counts = await asyncio.gather(*(shard.token_counts.remote() for shard in shards))  # each [L][E]
    if not counts:
        raise LookupError(f"app {app!r} has no expert-shard deployments")
    total = [[sum(c[layer][e] for c in counts) for e in range(len(row))]  # [L][E]
             for layer, row in enumerate(counts[0])]
    return total, len(counts)
