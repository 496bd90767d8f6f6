"""Expert-parallel runtime on plain Ray actors (no Serve): shards + a dispatcher in a placement group.

Used by `moray generate --num-shards N`, `moray bench --num-shards N` and the actor tests. Shards
request one GPU each when CUDA is there, else a fraction of a CPU; a placement group packs them
(`PACK`, default) or spreads them over nodes (`STRICT_SPREAD` / `SPREAD`). The dispatcher reaches
them over the data plane (`transport` "auto" or "socket", in a group of its own) or by Ray calls
("ray"). A placement board (`actors/board.py`) of the same name lets `Runtime.rebalance` move experts
between the shards while they serve (`actors/rebalance.py`).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moray.actors.board import PlacementBoard
from moray.actors.dataplane.directory import Directory
from moray.actors.dataplane.table import Transport
from moray.actors.dispatcher import Dispatcher
from moray.actors.experts import ExpertShard
from moray.actors.placement import Placement
from moray.actors.rebalance import MoveResult, Timeouts, rebalance
from moray.actors.threads import WaitPolicy, runtime_env
from moray.model.config import MixtralConfig
from moray.model.engine import EngineConfig, GenerateRequest, TokenEvent

log = logging.getLogger(__name__)


@dataclass
class RuntimeOptions:
    device: str = "cpu"
    dtype: str = "float32"
    strategy: str = "PACK"  # placement group strategy: PACK, SPREAD, STRICT_SPREAD, STRICT_PACK
    shard_cpus: float = 0.5
    dispatcher_cpus: float = 1.0
    shard_resources: dict[str, float] = field(default_factory=dict)  # extra custom resources per shard
    dispatcher_resources: dict[str, float] = field(default_factory=dict)
    threads: int = 1  # torch threads per actor; 0: all the node's cores (actors/threads.py)
    omp_wait_policy: WaitPolicy = "passive"  # how OpenMP's threads wait between parallel regions
    transport: Transport = "auto"  # auto: shared memory on a node, TCP across; socket: TCP; ray: actor calls


@dataclass
class Runtime:
    dispatcher: Any  # Ray actor handle of Dispatcher
    shards: list[Any]  # Ray actor handles of ExpertShard
    placement: Placement  # the placement the runtime started with (the board has the one in force)
    group: PlacementGroup
    dataplane: str | None = None  # the data-plane group of the shards' endpoints (None: transport "ray")
    board: str | None = None  # the placement board's group (online re-placement)

    def expert_loads(self) -> np.ndarray:
        """[L, E] tokens served per (layer, expert), summed over the shards' own counters."""
        counts = ray.get([s.token_counts.remote() for s in self.shards])
        return np.sum([np.asarray(c, dtype=np.float64) for c in counts], axis=0)

    def rebalance(self, redundant: int, *, loads: np.ndarray | None = None, margin: float = 0.05,
                  dry_run: bool = False, timeouts: Timeouts = Timeouts()) -> MoveResult:
        """Re-place the experts online from `loads` (default: the shards' counters since they started)."""
        if self.board is None:
            raise RuntimeError("this runtime was started without a placement board")
        loads = self.expert_loads() if loads is None else loads
        return rebalance(PlacementBoard(self.board), loads, redundant=redundant, margin=margin,
                         dry_run=dry_run, timeouts=timeouts)

    def generate(self, request: GenerateRequest) -> list[TokenEvent]:
        events: list[TokenEvent] = ray.get(self.dispatcher.complete.remote(request))
        return events

    async def stream(self, request: GenerateRequest) -> Any:
        async for ref in self.dispatcher.generate.options(num_returns="streaming").remote(request):
            yield await ref

    def shutdown(self) -> None:
        for actor in [self.dispatcher, *self.shards]:
            ray.kill(actor)
        remove_placement_group(self.group)
        if self.dataplane:
            Directory(self.dataplane).clear()
        if self.board:
            PlacementBoard(self.board).clear()


def _bundle(cpus: float, gpu: bool, extra: dict[str, float]) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": 1.0} if gpu else {}), **extra}


def start_runtime(model_dir: str, num_shards: int, engine_config: EngineConfig,
                  placement: Placement | None = None, options: RuntimeOptions | None = None) -> Runtime:
    """Start the shards and the dispatcher; return once every actor has loaded its weights."""
    opts = options or RuntimeOptions()
    cfg = MixtralConfig.load(model_dir)
    placement = placement or Placement.round_robin(cfg.n_layers, cfg.n_experts, num_shards)
    placement.validate(cfg.n_layers, cfg.n_experts)
    gpu = opts.device.startswith("cuda")
    bundles = [_bundle(opts.dispatcher_cpus, gpu, opts.dispatcher_resources)]
    bundles += [_bundle(opts.shard_cpus, gpu, opts.shard_resources) for _ in range(placement.num_shards)]
    group = placement_group(bundles, strategy=opts.strategy)
    ray.get(group.ready(), timeout=120)

    def in_bundle(i: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=i)

    name = f"runtime-{uuid.uuid4().hex[:12]}"
    dataplane = None if opts.transport == "ray" else name
    PlacementBoard(name).initialize(placement)
    shard_cls = ray.remote(ExpertShard)
    shards = [
        shard_cls.options(num_cpus=opts.shard_cpus, num_gpus=1 if gpu else 0, resources=opts.shard_resources,
                          scheduling_strategy=in_bundle(s + 1), max_restarts=-1, max_task_retries=0,
                          runtime_env=runtime_env(opts.omp_wait_policy))
        .remote(model_dir, s, placement.shard_experts(s), dtype=opts.dtype, device=opts.device,
                num_threads=opts.threads, group=dataplane, deterministic=engine_config.deterministic,
                board=name)
        for s in range(placement.num_shards)
    ]
    dispatcher = ray.remote(Dispatcher).options(
        num_cpus=opts.dispatcher_cpus, num_gpus=1 if gpu else 0, resources=opts.dispatcher_resources,
        scheduling_strategy=in_bundle(0), max_concurrency=1000, runtime_env=runtime_env(opts.omp_wait_policy),
    ).remote(model_dir, placement, shards, engine_config, dtype=opts.dtype, device=opts.device,
             num_threads=opts.threads, transport=opts.transport, group=dataplane, board=name)
    ray.get([s.info.remote() for s in shards] + [dispatcher.stats.remote()])
    log.info("runtime up: %d expert shards, placement strategy %s, transport %s", placement.num_shards,
             opts.strategy, opts.transport)
    return Runtime(dispatcher, shards, placement, group, dataplane, name)
