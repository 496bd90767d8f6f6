"""How hidden states travel between the dispatcher and the expert shards.

`ShardedExperts` is the dispatcher's `ExpertBackend`: per layer it routes each token's top-2
experts to the shards that own them (`Placement.route`), sends every involved shard ONE call with
just its rows (each token once per shard, in the model dtype), awaits them all concurrently and
adds the partial outputs back (`index_add_`). A shard handle is anything whose
`.serve.remote(layer, x, ids, gates)` is awaitable: a Ray actor handle (object-store transport,
works on CPU and across nodes) or a Serve `DeploymentHandle`.

A call that fails because its shard died is retried (Serve or Ray restarts the replica, or another
replica answers) until `shard_timeout_s` passes; then `ShardUnavailableError` (HTTP 503). Every
attempt is bounded by that deadline too: a Serve handle call made while a shard has no live replica
waits in Serve's router for the replacement, which might never come.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from moray.actors.placement import Placement, split_among_replicas
from moray.model.engine import STEP_REQUESTS
from moray.model.experts import split_by_shard

log = logging.getLogger(__name__)


class ShardUnavailableError(RuntimeError):
    """No live replica of an expert shard answered within the timeout."""


SERVE_RETRYABLE = ("BackPressureError", "DeploymentUnavailableError", "ReplicaUnavailableError")


def _retryable(e: BaseException) -> bool:
    """True for errors saying the call's replica is gone or not there yet, never for one the shard's own
    code raised (a `RayTaskError`). Measured on Ray 2.60: a Serve handle call whose replica is killed
    mid-call raises `ActorDiedError` at once (the next call waits in Serve's router for the
    replacement); an unreachable replica gives `ActorUnavailableError` (both `RayActorError`s); a
    replica gone between Serve's choice and the send gives `ReplicaUnavailableError`. Ray actor
    handles add `WorkerCrashedError` / `ObjectLostError`."""
    import ray.exceptions as rex
    import ray.serve.exceptions as sex

    if isinstance(e, rex.RayTaskError):
        return False
    retry = (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError)
    retry += tuple(getattr(sex, name) for name in SERVE_RETRYABLE if hasattr(sex, name))
    return isinstance(e, retry)


async def _bounded(response: Any, deadline: float) -> Any:
    """Await a handle call until `deadline` (perf_counter); past it, cancel it and raise TimeoutError."""
    try:
        return await asyncio.wait_for(response, max(deadline - time.perf_counter(), 1e-3))
    except asyncio.TimeoutError:
        if hasattr(response, "cancel"):  # a Serve DeploymentResponse (a Ray ObjectRef has none)
            response.cancel()
        raise


class ShardedExperts:
    def __init__(self, placement: Placement, shards: Sequence[Any], shard_timeout_s: float = 60.0) -> None:
        if len(shards) != placement.num_shards:
            raise ValueError(f"placement has {placement.num_shards} shards, got {len(shards)} handles")
        self.placement, self.shards, self.shard_timeout_s = placement, list(shards), shard_timeout_s
        self.replicas = [1] * len(shards)  # live replicas per shard: a shard's rows are split over them
        self.min_split_rows = 4
        self.calls = [0] * len(shards)
        self.call_s = [0.0] * len(shards)
        self.retries = 0

    async def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor,
                       gates: torch.Tensor) -> torch.Tensor:
        shard_of = self.placement.route(layer, ids)  # [T, A]
        parts = split_by_shard(ids, gates, shard_of, len(self.shards))
        calls = [(s, chunk) for s, (rows, _, _) in enumerate(parts) if len(rows)
                 for chunk in self._split(s, len(rows))]
        tags = STEP_REQUESTS.get() if layer == 0 else ()  # request ids reach the shards' logs once a step
        outs = await asyncio.gather(
            *(self._call(s, layer, x[parts[s][0][c]], parts[s][1][c], parts[s][2][c], tags) for s, c in calls)
        )
        y = torch.zeros_like(x)
        for (s, c), part in zip(calls, outs, strict=True):
            y.index_add_(0, parts[s][0][c], part.to(y.device))
        return y

    def _split(self, shard: int, n: int) -> list[slice]:
        """A shard's rows in one chunk per live replica (Serve routes concurrent calls apart)."""
        k = max(1, min(self.replicas[shard], n // self.min_split_rows))
        sizes = split_among_replicas(n, [0.0] * k)
        bounds = [sum(sizes[:i]) for i in range(k + 1)]
        return [slice(bounds[i], bounds[i + 1]) for i in range(k)]

    async def _call(self, shard: int, layer: int, x: torch.Tensor, ids: torch.Tensor,
                    gates: torch.Tensor, tags: tuple[str, ...] = ()) -> torch.Tensor:
        start = time.perf_counter()
        deadline, delay = start + self.shard_timeout_s, 0.1
        while True:
            try:
                y = await _bounded(self.shards[shard].serve.remote(layer, x, ids, gates, tags), deadline)
                break
            except Exception as e:
                if not _retryable(e) and not isinstance(e, asyncio.TimeoutError):
                    raise
                if isinstance(e, asyncio.TimeoutError) or time.perf_counter() + delay > deadline:
                    raise ShardUnavailableError(
                        f"expert shard {shard} has no live replica after {self.shard_timeout_s:g} s"
                    ) from e
                self.retries += 1
                log.warning("expert shard %d call failed (%s); retrying in %.1f s", shard, type(e).__name__,
                            delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.calls[shard] += 1
        self.call_s[shard] += time.perf_counter() - start
        return y

    def stats(self) -> dict[str, Any]:
        return {"shard_calls": list(self.calls), "shard_call_s": list(self.call_s),
                "shard_retries": self.retries}
