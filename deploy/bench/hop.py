"""`moray bench --hop`: one layer's hop, dispatcher -> 2 expert shards -> back, per transport.

The shards are echo shards (their "experts" return the rows they get), so what is timed is the
transport and the dispatcher's own per-layer work: `ShardedExperts` routing every row to both shards,
the sends, the waits, and adding the answers back. The dispatcher runs in an actor of its own, as in
serving. Transports: a Serve `DeploymentHandle` call ("serve"), a Ray actor call ("ray"), the data
plane over shared memory ("shm") and over TCP ("socket").
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from collections.abc import Sequence
from typing import Any

import torch

from moray.actors.dataplane.channel import ChannelSpec
from moray.actors.dataplane.directory import Directory, Heartbeat
from moray.actors.dataplane.endpoint import ShardEndpoint
from moray.actors.dataplane.frames import Limits
from moray.actors.dataplane.table import DataPlane
from moray.actors.placement import Placement
from moray.actors.sharded import HandleLinks, Links, ShardedExperts

log = logging.getLogger(__name__)

ROWS = (1, 16, 64, 256)
DIM = 1024
TRANSPORTS = ("serve", "ray", "shm", "socket")


class EchoShard:
    """A shard whose experts give back what they get: the hop without the compute."""

    def __init__(self, shard: int, group: str | None = None) -> None:
        import ray

        torch.set_num_threads(1)
        self.endpoint = None
        if group:
            self.endpoint = ShardEndpoint(self.serve, Limits(0, DIM, torch.float32, 1),
                                          host=ray.util.get_node_ip_address())
            node = ray.get_runtime_context().get_node_id()
            self.heartbeat = Heartbeat(Directory(group), shard, uuid.uuid4().hex[:12],
                                       {**self.endpoint.address(), "node": node})

    def serve(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
              request_ids: Sequence[str] = ()) -> torch.Tensor:
        return x

    def ready(self) -> bool:
        return True


class HopDispatcher:
    """Plays the dispatcher: times `ShardedExperts` on one layer whose every row goes to both shards."""

    def __init__(self) -> None:
        torch.set_num_threads(1)

    async def measure(self, transport: str, shards: list[Any], group: str | None, rows: Sequence[int],
                      iters: int) -> dict[int, list[float]]:
        links = self._links(transport, shards, group, max(rows))
        experts = ShardedExperts(Placement.round_robin(1, 2, 2), links, shard_timeout_s=30.0)
        out: dict[int, list[float]] = {}
        for n in rows:
            x = torch.randn(n, DIM)
            ids = torch.tensor([[0, 1]]).expand(n, 2).contiguous()  # expert 0 on shard 0, 1 on shard 1
            gates = torch.full((n, 2), 0.5)
            for _ in range(max(iters // 10, 3)):  # warm-up: channels open, kernels and caches warm
                await experts(0, x, ids, gates)
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                y = await experts(0, x, ids, gates)
                times.append(time.perf_counter() - start)
            assert torch.equal(y, 2 * x), "the echo came back wrong"  # both shards echo every row
            out[n] = times
        if isinstance(links, DataPlane):
            links.close()
        return out

    def _links(self, transport: str, shards: list[Any], group: str | None, max_rows: int) -> Links:
        import ray

        if transport in ("serve", "ray"):
            return HandleLinks(shards)
        assert group is not None
        spec = ChannelSpec(max_rows=max_rows, dim=DIM, dtype=torch.float32)
        return DataPlane(Directory(group), spec, 2, node=ray.get_runtime_context().get_node_id(),
                         transport="auto" if transport == "shm" else "socket")


def _start_shards(transport: str, group: str | None) -> tuple[list[Any], Any]:
    import ray

    if transport == "serve":
        from ray import serve

        started = not _serve_running()
        if started:  # no proxies: nothing here is reached over HTTP
            serve.start(proxy_location="Disabled")
        deployment: Any = serve.deployment(EchoShard, ray_actor_options={"num_cpus": 0})
        targets = [serve.RunTarget(deployment.options(name=f"hop-shard-{s}").bind(s), name=f"moray-hop-{s}",
                                   route_prefix=None) for s in range(2)]
        handles = serve.run_many(targets)  # both at once

        def stop() -> None:
            for s in range(2):
                serve.delete(f"moray-hop-{s}")
            if started:  # a Serve started without proxies must not outlive us: a later app needs its own
                serve.shutdown()

        return handles, stop
    actor: Any = ray.remote(num_cpus=0)(EchoShard)
    shards = [actor.remote(s, group) for s in range(2)]  # with an endpoint where `group` is given
    ray.get([s.ready.remote() for s in shards])
    return shards, lambda: [ray.kill(s) for s in shards]


def _serve_running() -> bool:
    from ray.serve.context import _get_global_client  # Serve has no public "is it running" call

    return _get_global_client(raise_if_no_controller_running=False) is not None


def measure_hop(transports: Sequence[str] = TRANSPORTS, rows: Sequence[int] = ROWS,
                iters: int = 300) -> dict[str, dict[int, dict[str, float]]]:
    """Per transport and row count: p50 / p90 / p99 of one layer's hop, in microseconds. The Ray actor,
    shared-memory and TCP transports share one pair of echo actors (with a data-plane endpoint)."""
    import ray

    dispatcher: Any = ray.remote(num_cpus=0)(HopDispatcher).remote()
    group = f"hop-{uuid.uuid4().hex[:8]}"
    actors: tuple[list[Any], Any] | None = None
    report: dict[str, dict[int, dict[str, float]]] = {}
    try:
        for transport in transports:
            if transport == "serve":
                shards, stop = _start_shards(transport, None)
            else:
                actors = actors or _start_shards(transport, group)
                shards, stop = actors[0], lambda: None
            try:
                times = ray.get(dispatcher.measure.remote(transport, shards, group, list(rows), iters))
            finally:
                stop()
            report[transport] = {n: _percentiles(ts) for n, ts in times.items()}
            log.info("hop %s: %s", transport, {n: round(p["p50_us"]) for n, p in report[transport].items()})
    finally:
        if actors:
            actors[1]()
            Directory(group).clear()
        ray.kill(dispatcher)
    return report


def _percentiles(seconds: list[float]) -> dict[str, float]:
    us = sorted(t * 1e6 for t in seconds)
    q = statistics.quantiles(us, n=100)
    return {"p50_us": statistics.median(us), "p90_us": q[89], "p99_us": q[98]}


def hop_markdown(report: dict[str, dict[int, dict[str, float]]]) -> str:
    rows = sorted({n for per in report.values() for n in per})
    lines = ["| transport | " + " | ".join(f"{n} rows p50 / p99 (µs)" for n in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for transport, per in report.items():
        cells = [f"{per[n]['p50_us']:.0f} / {per[n]['p99_us']:.0f}" if n in per else "" for n in rows]
        lines.append(f"| {transport} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
