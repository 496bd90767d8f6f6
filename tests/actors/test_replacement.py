"""Online expert re-placement on the Ray-actor runtime (issue 15): balance from the shards' own counters,
streams unchanged across a move, memory by what is held, failures leave a consistent placement."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch

from moray.actors.board import STALE_S, PlacementBoard
from moray.actors.dispatcher import Dispatcher
from moray.actors.placement import Placement
from moray.actors.rebalance import MoveResult, align, balancedness, plan_move
from moray.actors.runtime import Runtime, start_runtime
from moray.model.config import MixtralConfig
from moray.model.engine import AsyncEngine, EngineConfig, GenerateRequest, TokenEvent
from moray.model.mixtral import load_local
from moray.model.sampling import SamplingParams
from moray.model.tiny import TinySpec, make_tiny
from moray.model.tokenizer import Tokenizer

ENGINE = EngineConfig(max_num_seqs=16, max_batch_tokens=256, block_size=8, max_model_len=512)
SPEC = TinySpec(layers=2, dim=64, heads=4, kv_heads=2, experts=4, hidden=128, seed=3)
HOT = 0  # the expert every token of every layer goes to


@pytest.fixture(scope="module")
def skewed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 experts a layer; the router sends every token to expert 0 (its other slot spreads over the rest)."""
    return make_tiny(tmp_path_factory.mktemp("skewed"), SPEC, shards=2, router_bias={HOT: 6.0})


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 32000, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=1)


def local_run(ckpt: Path, requests: list[GenerateRequest]) -> list[list[int]]:
    """Each request alone through the in-process model (the oracle): its token ids."""
    model, experts = load_local(ckpt)
    engine = AsyncEngine(model, experts, Tokenizer.from_model_dir(ckpt), ENGINE)

    async def one(r: GenerateRequest) -> list[int]:
        return [e.token_id async for e in engine.generate(r)]

    return [asyncio.run(one(r)) for r in requests]


async def stream(rt: Runtime, req: GenerateRequest) -> list[TokenEvent]:
    return [e async for e in rt.stream(req)]


def run_all(rt: Runtime, reqs: list[GenerateRequest]) -> list[list[int]]:
    async def together() -> list[list[TokenEvent]]:
        return await asyncio.gather(*(stream(rt, r) for r in reqs))

    return [[e.token_id for e in events] for events in asyncio.run(together())]


def shard_loads(rt: Runtime) -> np.ndarray:
    """[L, G] tokens each shard served per layer, from the shards' own counters."""
    counts = ray.get([s.token_counts.remote() for s in rt.shards])  # G x [L][E]
    return np.array([np.asarray(c).sum(axis=1) for c in counts]).T


def max_over_mean(per_shard: np.ndarray) -> np.ndarray:
    return per_shard.max(axis=1) / per_shard.mean(axis=1)  # [L]


def assert_holds(rt: Runtime, placement: Placement, cfg: MixtralConfig) -> None:
    """Every shard holds exactly its experts of `placement`, and its memory is exactly theirs."""
    for s, info in enumerate(ray.get([s.info.remote() for s in rt.shards])):
        want = placement.shard_experts(s)
        assert {int(k): v for k, v in info["experts"].items()} == want
        assert info["param_bytes"] == sum(map(len, want.values())) * cfg.expert_bytes(4)


def board_state(rt: Runtime) -> Any:
    assert rt.board is not None
    return PlacementBoard(rt.board).read()


# ---- planning (no Ray) -------------------------------------------------------------------------------
def test_plan_keeps_experts_in_place_and_balances_a_one_hot_layer() -> None:
    current = Placement.round_robin(2, 4, 4)
    loads = np.array([[92.0, 30, 41, 21], [92.0, 33, 32, 27]])
    plan = plan_move(current, loads, redundant=2)
    assert plan.before_overall == pytest.approx(0.5, abs=1e-9)  # shard 0 serves 92 of 184 tokens
    assert (max_over_mean_loads(plan.target, loads) <= 1.15).all()
    for layer in range(2):  # the shards are renumbered to keep what they can: expert 1 is never moved
        assert plan.target.owners(layer, 1) == [1] and plan.target.owners(layer, HOT)[0] == 0
        assert len([m for m in plan.moved if m[0] == layer]) <= 3
    assert align(plan.target, plan.target) == plan.target


def max_over_mean_loads(p: Placement, loads: np.ndarray) -> np.ndarray:
    from moray.actors.placement import gpu_loads

    return max_over_mean(gpu_loads(p, loads))


def test_balancedness_per_layer_and_overall() -> None:
    layers, overall = balancedness(np.array([[4.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]))
    np.testing.assert_allclose(layers, [0.25, 1.0, 1.0])
    assert overall == pytest.approx((1 + 1) / (4 + 1))


# ---- the runtime ---------------------------------------------------------------------------------------
def test_one_rebalance_balances_the_shards_own_counters(ray_session: Any, skewed_dir: Path) -> None:
    cfg = MixtralConfig.load(skewed_dir)
    rt = start_runtime(str(skewed_dir), 4, ENGINE)
    try:
        dispatcher_bytes = ray.get(rt.dispatcher.stats.remote())["param_bytes"]
        run_all(rt, [GenerateRequest(p, greedy(16)) for p in prompts(8)])
        before = max_over_mean(shard_loads(rt))
        assert (before >= 1.8).all(), before
        result: MoveResult = rt.rebalance(redundant=2)
        assert result.outcome == "applied", result.reason
        state = board_state(rt)
        assert state.version == 2 and state.move.phase == "done"
        assert_holds(rt, state.placement, cfg)
        assert ray.get(rt.dispatcher.stats.remote())["param_bytes"] == dispatcher_bytes
        ray.get([s.reset_counts.remote() for s in rt.shards])
        run_all(rt, [GenerateRequest(p, greedy(16)) for p in prompts(8, seed=1)])
        after = max_over_mean(shard_loads(rt))
        assert (after <= 1.2).all(), (before, after, state.placement.slots)
        assert ray.get(rt.dispatcher.stats.remote())["placement_version"] == 2
    finally:
        rt.shutdown()


def hold_streams_at(dispatcher: Any, tokens: int) -> None:
    """From now on the dispatcher's engine waits before a step for a sequence that has `tokens` tokens,
    until `release_streams`: between steps, with no expert call in flight, so a move's commit can still
    switch its routing. Installed in the actor by `__ray_call__` (not on its event loop: the gate is a
    threading.Event; nested functions travel by value)."""

    def install(actor: Any) -> None:
        engine, gate = actor.engine, threading.Event()
        step = engine._step

        async def held_step(sched: list[tuple[Any, int]]) -> None:
            if any(seq.generated >= tokens for seq, _ in sched):
                await asyncio.to_thread(gate.wait)
            await step(sched)

        engine._step, engine.release_streams = held_step, gate.set

    ray.get(dispatcher.__ray_call__.remote(install))


def release_streams(dispatcher: Any) -> None:
    ray.get(dispatcher.__ray_call__.remote(lambda actor: actor.engine.release_streams()))


def test_streams_across_a_move_keep_their_greedy_tokens(ray_session: Any, skewed_dir: Path) -> None:
    """The move starts once every stream has its first token and is in force before any passes half
    its tokens (they wait there): each stream has tokens routed with both placements, at any speed."""
    n = 120
    reqs = [GenerateRequest(p, greedy(n)) for p in prompts(16, seed=2)]
    want = local_run(skewed_dir, reqs)
    rt = start_runtime(str(skewed_dir), 4, ENGINE)
    try:
        loads = np.array([[92.0, 30, 41, 21], [92.0, 33, 32, 27]])
        hold_streams_at(rt.dispatcher, n // 2)

        async def run() -> list[list[int]]:
            first = [asyncio.Event() for _ in reqs]

            async def one(req: GenerateRequest, started: asyncio.Event) -> list[TokenEvent]:
                events = []
                async for event in rt.stream(req):
                    events.append(event)
                    started.set()
                return events

            streams = [asyncio.ensure_future(one(r, e)) for r, e in zip(reqs, first, strict=True)]
            await asyncio.gather(*(e.wait() for e in first))
            move = await asyncio.to_thread(rt.rebalance, 2, loads=loads)
            assert move.outcome == "applied", move.reason
            assert not any(s.done() for s in streams)  # the move happened while they ran
            assert (await rt.dispatcher.stats.remote())["placement_version"] == 2
            release_streams(rt.dispatcher)
            return [[e.token_id for e in events] for events in await asyncio.gather(*streams)]

        assert asyncio.run(run()) == want
    finally:
        rt.shutdown()


def test_a_failed_load_keeps_the_old_placement(ray_session: Any, skewed_dir: Path, tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(skewed_dir, tmp_path / "ckpt"))
    cfg = MixtralConfig.load(ckpt)
    reqs = [GenerateRequest(p, greedy(12)) for p in prompts(4, seed=3)]
    want = local_run(skewed_dir, reqs)
    rt = start_runtime(str(ckpt), 4, ENGINE)
    try:
        for f in ckpt.glob("*.safetensors"):  # every shard file unreadable from now on: a new file, as
            size = f.stat().st_size  # the running processes' weights may still be mapped from the old one
            f.unlink()
            f.write_bytes(b"\xff" * size)
        result = rt.rebalance(redundant=2, loads=np.array([[92.0, 30, 41, 21], [92.0, 33, 32, 27]]))
        assert result.outcome == "aborted"
        assert "could not load its experts" in result.reason and "stays in force" in result.reason
        state = board_state(rt)
        assert state.version == 1 and state.move.phase == "abort" and state.move.reason in result.reason
        assert_holds(rt, rt.placement, cfg)  # what was loaded for the move is gone again
        assert run_all(rt, reqs) == want
        assert ray.get(rt.dispatcher.stats.remote())["placement_version"] == 1
    finally:
        rt.shutdown()


def test_a_shard_replica_killed_mid_move_abandons_it(ray_session: Any, skewed_dir: Path) -> None:
    cfg = MixtralConfig.load(skewed_dir)
    reqs = [GenerateRequest(p, greedy(12)) for p in prompts(4, seed=4)]
    want = local_run(skewed_dir, reqs)
    loads = np.array([[92.0, 30, 41, 21], [92.0, 33, 32, 27]])
    rt = start_runtime(str(skewed_dir), 4, ENGINE)
    try:
        victim = ray.get(rt.shards[3].info.remote())
        os.kill(victim["pid"], signal.SIGKILL)  # its heartbeat is still fresh: it takes part in the move
        result = rt.rebalance(redundant=2, loads=loads)
        assert result.outcome == "aborted" and "stopped reporting" in result.reason, result.reason
        assert board_state(rt).version == 1
        assert ray.get(rt.shards[3].info.remote())["replica"] != victim["replica"]  # Ray restarted it
        _settle(rt, "1")
        assert_holds(rt, rt.placement, cfg)
        assert run_all(rt, reqs) == want
        again = rt.rebalance(redundant=2, loads=loads)  # the restarted replica takes part in the next one
        assert again.outcome == "applied", again.reason
        assert_holds(rt, board_state(rt).placement, cfg)
        assert run_all(rt, reqs) == want
    finally:
        rt.shutdown()


def test_a_dispatcher_killed_mid_move_is_not_waited_for(ray_session: Any, skewed_dir: Path) -> None:
    """The move finishes without the dead dispatcher; one started afterwards routes with the new placement."""
    cfg = MixtralConfig.load(skewed_dir)
    reqs = [GenerateRequest(p, greedy(12)) for p in prompts(4, seed=5)]
    want = local_run(skewed_dir, reqs)
    rt = start_runtime(str(skewed_dir), 4, ENGINE)
    try:
        pid = ray.get(rt.dispatcher.stats.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
        t = time.monotonic()
        result = rt.rebalance(redundant=2, loads=np.array([[92.0, 30, 41, 21], [92.0, 33, 32, 27]]))
        assert result.outcome == "applied", result.reason
        assert time.monotonic() - t < 3 * STALE_S
        state = board_state(rt)
        assert_holds(rt, state.placement, cfg)
        rt.dispatcher = ray.remote(Dispatcher).options(num_cpus=0, max_concurrency=1000).remote(
            str(skewed_dir), rt.placement, rt.shards, ENGINE, group=rt.dataplane, board=rt.board)
        assert ray.get(rt.dispatcher.stats.remote())["placement_version"] == state.version
        assert run_all(rt, reqs) == want
    finally:
        rt.shutdown()


def _settle(rt: Runtime, tag: str, timeout_s: float = 20.0) -> None:
    """Wait until every shard's current replica holds placement `tag` (a restarted one loads first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(i["placement"] == tag for i in ray.get([s.info.remote() for s in rt.shards])):
            return
        time.sleep(0.2)
    raise AssertionError(f"shards did not settle on placement {tag}")




def test_periodic_rebalancing_moves_once_per_interval(ray_session: Any) -> None:
    """Several replicas running the periodic loop: the board's `last` record lets one move per interval;
    a second coordinator is refused while the first holds the lock."""
    from moray.actors.rebalance import rebalance

    board = PlacementBoard(f"periodic-{os.getpid()}")
    board.initialize(Placement.round_robin(2, 4, 4))
    loads = np.ones((2, 4))
    try:
        first = rebalance(board, loads, redundant=0, due_s=60.0)
        assert first.outcome == "skipped" and first.cause == "margin"  # balanced already: nothing to move
        assert rebalance(board, loads, redundant=0, due_s=60.0).outcome == "not-due"
        assert rebalance(board, loads, redundant=0, dry_run=True).outcome == "dry-run"
        assert board.try_lock("someone else")
        busy = rebalance(board, loads, redundant=0)
        assert busy.outcome == "busy" and busy.cause == "busy"
    finally:
        board.clear()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hold_loads_only_the_gained_experts_and_frees_the_lost(skewed_dir: Path, dtype: str) -> None:
    """In process, no Ray: kept experts keep their very weight tensors, gained ones are read from the
    checkpoint, and each expert's weights own their memory (bf16 on CPU is left unpacked: a view into a
    stack of experts would keep the lost ones allocated)."""
    from moray.actors.experts import ExpertShard

    cfg = MixtralConfig.load(skewed_dir)
    shard = ExpertShard(str(skewed_dir), 0, {0: [0, 1], 1: [0]}, dtype=dtype)
    kept = shard.banks[0].w13[1]
    shard.hold({0: [1, 3], 1: [2]}, "2")
    assert shard.experts == {0: [1, 3], 1: [2]} and shard.holding.tag == "2"
    assert shard.banks[0].w13[0] is kept  # expert 1 of layer 0: not re-read, not copied
    assert shard.param_bytes() == 3 * cfg.expert_bytes(torch.finfo(getattr(torch, dtype)).bits // 8)
    for bank in shard.banks.values():
        for w in (*bank.w13, *bank.w2):
            if not w.is_mkldnn:
                assert w.untyped_storage().nbytes() == w.numel() * w.element_size()
    x = torch.randn(5, cfg.dim, dtype=getattr(torch, dtype))
    ids, gates = torch.tensor([[1, 3]] * 5), torch.full((5, 2), 0.5, dtype=x.dtype)
    assert shard.serve(0, x, ids, gates).shape == x.shape
    with pytest.raises(ValueError, match="does not hold"):
        shard.serve(0, x, torch.tensor([[0, 1]] * 5), gates)
