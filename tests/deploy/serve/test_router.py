"""The expert shards' least-loaded request router, on Serve's own `RequestRouter` base and request types."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from moray.deploy.serve.router import LeastLoadedRouter, shard_router_config
from moray.deploy.serve.state import shard_name


def make_router() -> tuple[Any, list[Any], Any]:
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

    dep = DeploymentID(name=shard_name(0), app_name="moray")
    router = LeastLoadedRouter(deployment_id=dep, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state()
    replicas = [SimpleNamespace(replica_id=ReplicaID(u, dep)) for u in ("r0", "r1", "r2")]
    return router, replicas, dep


def pending() -> Any:
    """A call as a dispatcher step makes it: every call of a step shares one internal request id."""
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    return PendingRequest(args=[0], kwargs={}, metadata=RequestMetadata(request_id="step",
                                                                         internal_request_id="step"))


async def choose(router: Any, replicas: list[Any]) -> Any:
    request = pending()
    ranks = await router.choose_replicas(replicas, request)
    assert [len(rank) for rank in ranks] == [1] * len(replicas)  # every replica, one per rank
    assert request.routing_context.should_backoff  # Serve backs off before asking again
    return ranks[0][0].replica_id


def test_router_deals_concurrent_chunks_one_per_replica() -> None:
    async def body() -> None:
        router, replicas, _ = make_router()
        first = [await choose(router, replicas) for _ in range(3)]  # chosen, none sent yet
        assert len(set(first)) == 3
        for rid in first:
            router.on_send_request(rid)
        for rid in first:
            router.on_request_completed(rid, "step")
        assert len({await choose(router, replicas) for _ in range(3)}) == 3

    asyncio.run(body())


def test_router_avoids_the_replica_with_calls_in_flight() -> None:
    async def body() -> None:
        router, replicas, _ = make_router()
        busy = replicas[0].replica_id
        for _ in range(3):
            router.on_send_request(busy)
        picks = [await choose(router, replicas) for _ in range(4)]
        assert busy not in picks  # the others reach 2 in flight each, still under 3
        assert router.in_flight(busy) == 3
        for _ in range(3):
            router.on_request_completed(busy, "step")
        assert await choose(router, replicas) == busy

    asyncio.run(body())


def test_router_splits_a_step_even_when_a_completion_is_reported_late() -> None:
    """One replica still looks busy with the last step's call (Serve reports completions a little
    late): the step's first chunk goes to the other replica, the second must not follow it."""
    async def body() -> None:
        router, replicas, _ = make_router()
        pair = replicas[:2]
        for _ in range(20):
            late = pair[0].replica_id
            router.on_send_request(late)  # last step's call, its completion not reported yet
            first = await choose(router, pair)
            second = await choose(router, pair)
            assert first != late and second == late
            for rid in (first, second):
                router.on_send_request(rid)
                router.on_request_completed(rid, "step")
            router.on_request_completed(late, "step")
            pair.reverse()

    asyncio.run(body())


def test_router_config_names_the_router() -> None:
    config = shard_router_config()
    assert config.request_router_class.endswith(":LeastLoadedRouter")
