"""Expert-parallel runtime on Ray actors: distributed == local, memory by role, batching, multi-node."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from moray.actors.experts import ExpertShard
from moray.actors.placement import Placement
from moray.actors.runtime import Runtime, RuntimeOptions, start_runtime
from moray.model.config import MixtralConfig
from moray.model.engine import AsyncEngine, EngineConfig, GenerateRequest, TokenEvent
from moray.model.mixtral import load_local
from moray.model.sampling import SamplingParams
from moray.model.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
ENGINE = EngineConfig(max_num_seqs=16, max_batch_tokens=256, block_size=8, max_model_len=512)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 32000, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def local_run(ckpt: Path, requests: list[GenerateRequest], config: EngineConfig = ENGINE
              ) -> list[list[TokenEvent]]:
    """Each request alone through the in-process model (the oracle)."""
    model, experts = load_local(ckpt, deterministic=config.deterministic)
    engine = AsyncEngine(model, experts, Tokenizer.from_model_dir(ckpt), config)

    async def one(r: GenerateRequest) -> list[TokenEvent]:
        return [e async for e in engine.generate(r)]

    return [asyncio.run(one(r)) for r in requests]


def assert_same(got: list[TokenEvent], want: list[TokenEvent]) -> None:
    assert [e.token_id for e in got] == [e.token_id for e in want]
    for a, b in zip(got, want, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


@pytest.fixture(scope="module")
def oracle(tiny4_dir: Path) -> list[list[TokenEvent]]:
    return local_run(tiny4_dir, [GenerateRequest(p, GREEDY) for p in prompts(3)])


# One shard, every expert on its own shard (4), and each transport once (shared memory: "auto" on one node).
@pytest.mark.parametrize("num_shards, transport", [(1, "auto"), (4, "auto"), (2, "socket"), (3, "ray")])
def test_distributed_equals_local(
    ray_session: Any, tiny4_dir: Path, oracle: list[list[TokenEvent]], num_shards: int, transport: str
) -> None:
    rt = start_runtime(str(tiny4_dir), num_shards, ENGINE, options=RuntimeOptions(transport=transport))
    try:
        for p, want in zip(prompts(3), oracle, strict=True):
            assert_same(rt.generate(GenerateRequest(p, GREEDY)), want)
        cfg = MixtralConfig.load(tiny4_dir)
        infos = ray.get([s.info.remote() for s in rt.shards])
        for s, info in enumerate(infos):
            held = sum(len(v) for v in rt.placement.shard_experts(s).values())
            assert info["param_bytes"] == held * cfg.expert_bytes(4)
        stats = ray.get(rt.dispatcher.stats.remote())
        assert not [n for n in stats["param_names"] if "expert" in n]
        assert sum(stats["shard_calls"]) > 0
        if transport != "ray":  # every shard's rows went over its channel, not through Ray
            assert stats["channels"] == [1] * num_shards and stats["channels_opened"] == num_shards
            assert [info["channels"] for info in infos] == [1] * num_shards
    finally:
        rt.shutdown()


def test_fp8_checkpoint_through_two_shards_equals_in_process(ray_session: Any, tiny4_dir: Path,
                                                            make_fp8: Callable[..., Path]) -> None:
    """A compressed-tensors FP8 checkpoint (per-channel scales, written by the library) through 2 shards over
    the data plane: each shard dequantizes its own experts (resident: the fp32 size), and the greedy tokens
    equal the in-process model's on the same checkpoint."""
    fp8 = make_fp8(tiny4_dir, "channel", "float-quantized")
    requests = [GenerateRequest(p, GREEDY) for p in prompts(2)]
    want = local_run(fp8, requests)
    rt = start_runtime(str(fp8), 2, ENGINE)
    try:
        for r, w in zip(requests, want, strict=True):
            assert_same(rt.generate(r), w)
        cfg = MixtralConfig.load(fp8)
        assert cfg.checkpoint_quant is not None
        for s, info in enumerate(ray.get([s.info.remote() for s in rt.shards])):
            held = sum(len(v) for v in rt.placement.shard_experts(s).values())
            assert info["param_bytes"] == held * cfg.expert_bytes(4)
    finally:
        rt.shutdown()


@pytest.mark.parametrize("transport", ["auto", "socket"])
def test_multi_node_spread(ray_session: Any, tiny4_dir: Path, oracle: list[list[TokenEvent]],
                           transport: str) -> None:
    """Dispatcher on the head node, the two shards on the two expert nodes: the rows go over TCP."""
    opts = RuntimeOptions(strategy="STRICT_SPREAD", shard_resources={"expert_node": 1},
                          dispatcher_resources={"head_node": 0.5}, transport=transport)
    rt = start_runtime(str(tiny4_dir), 2, ENGINE, options=opts)
    try:
        shard_nodes = [info["node_id"] for info in ray.get([s.info.remote() for s in rt.shards])]
        dispatcher_node = ray.get(rt.dispatcher.node_id.remote())
        assert len({*shard_nodes, dispatcher_node}) == 3
        head = [n["NodeID"] for n in ray.nodes() if n["Resources"].get("head_node")]
        assert dispatcher_node == head[0]
        for p, want in zip(prompts(3), oracle, strict=True):
            assert_same(rt.generate(GenerateRequest(p, GREEDY)), want)
        assert ray.get(rt.dispatcher.stats.remote())["channels"] == [1, 1]
        streams_survive_a_closed_channel(rt, tiny4_dir)
    finally:
        rt.shutdown()


async def streams_with_a_fault(rt: Runtime, reqs: list[GenerateRequest], fault: Callable[[], Awaitable[None]],
                              after: int = 10) -> list[list[TokenEvent]]:
    """Stream `reqs` together through `rt`; once every stream has `after` tokens (none has ended), await
    `fault()`; then every stream's tokens."""
    got: list[list[TokenEvent]] = [[] for _ in reqs]

    async def consume(i: int) -> None:
        async for event in rt.stream(reqs[i]):
            got[i].append(event)

    streams = [asyncio.ensure_future(consume(i)) for i in range(len(reqs))]
    while min(len(g) for g in got) < after:
        assert not any(s.done() for s in streams), "a stream ended early"
        await asyncio.sleep(0.01)
    await fault()
    await asyncio.gather(*streams)
    return got


def test_killed_shard_mid_stream(ray_session: Any, tiny4_dir: Path) -> None:
    """SIGKILL a shard's process while streams run: Ray restarts it, it announces a new endpoint, the
    dispatcher connects to it, and every stream finishes with the tokens it would have had."""
    long = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True, logprobs=2)
    reqs = [GenerateRequest(p, long) for p in prompts(3, seed=11)]
    want = local_run(tiny4_dir, reqs)
    rt = start_runtime(str(tiny4_dir), 2, ENGINE)
    try:
        victim = ray.get(rt.shards[1].info.remote())

        async def kill() -> None:
            os.kill(victim["pid"], signal.SIGKILL)

        got = asyncio.run(streams_with_a_fault(rt, reqs, kill))
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
        stats = ray.get(rt.dispatcher.stats.remote())
        assert stats["channels"] == [1, 1] and stats["channels_opened"] == 3 and stats["shard_retries"] >= 1
        assert ray.get(rt.shards[1].info.remote())["replica"] != victim["replica"]
    finally:
        rt.shutdown()


def shut_channels(shard: Any) -> int:
    """Shut down (both ways, at once) every data-plane connection the shard actor `shard` has open, from
    inside its process, while frames may be on their way: what a vanishing peer looks like."""

    def shut(s: ExpertShard) -> int:
        sessions = list(s.endpoint._sessions.values()) if s.endpoint else []
        for session in sessions:
            session.conn.shutdown(socket.SHUT_RDWR)
        return len(sessions)

    return int(ray.get(shard.__ray_call__.remote(shut)))


def streams_survive_a_closed_channel(rt: Runtime, ckpt: Path) -> None:
    """Shard 1 closes its channel (TCP, across nodes) while 3 streams generate: the dispatcher notices at
    once (a call in flight is retried; an idle channel is replaced before the next step), opens a new
    channel to the same live replica, and every stream keeps the tokens it would have had."""
    long = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True, logprobs=2)
    reqs = [GenerateRequest(p, long) for p in prompts(3, seed=12)]
    opened = ray.get(rt.dispatcher.stats.remote())["channels_opened"]

    async def shut() -> None:
        assert await asyncio.to_thread(shut_channels, rt.shards[1]) == 1

    for g, w in zip(asyncio.run(streams_with_a_fault(rt, reqs, shut)), local_run(ckpt, reqs), strict=True):
        assert_same(g, w)
    stats = ray.get(rt.dispatcher.stats.remote())
    assert {s for s, _, _ in stats["shard_faults"]} <= {1}, stats["shard_faults"]  # faults: shard 1's only
    assert stats["channels"] == [1, 1] and stats["channels_opened"] >= opened + 1


def test_deterministic_mode_through_shards(ray_session: Any, tiny4_dir: Path) -> None:
    """--deterministic over the data plane: batched through 2 shards equals each request alone in process,
    bit for bit (token ids and logprobs), greedy and seeded sampling."""
    config = dataclasses.replace(ENGINE, deterministic=True)
    reqs = [GenerateRequest(p, SamplingParams(max_tokens=16, temperature=0.0 if i % 2 else 0.8, seed=i,
                                              ignore_eos=True, logprobs=1))
            for i, p in enumerate(prompts(6, seed=5))]
    want = local_run(tiny4_dir, reqs, config)
    rt = start_runtime(str(tiny4_dir), 2, config)
    try:
        async def together() -> list[list[TokenEvent]]:
            return await asyncio.gather(*(stream(rt, r, 0.0) for r in reqs))

        for got, w in zip(asyncio.run(together()), want, strict=True):
            assert [e.token_id for e in got] == [e.token_id for e in w]
            assert [e.logprob for e in got] == [e.logprob for e in w]
    finally:
        rt.shutdown()


@pytest.fixture(scope="module")
def runtime2(ray_session: Any, tiny_dir: Path) -> Any:
    rt = start_runtime(str(tiny_dir), 2, ENGINE)
    yield rt
    rt.shutdown()


async def stream(rt: Runtime, req: GenerateRequest, delay: float) -> list[TokenEvent]:
    await asyncio.sleep(delay)
    return [e async for e in rt.stream(req)]


def test_continuous_batching_equals_alone(runtime2: Runtime, tiny_dir: Path) -> None:
    reqs = [
        GenerateRequest(p, SamplingParams(max_tokens=4 + i % 7, temperature=0.0, ignore_eos=True, logprobs=0))
        for i, p in enumerate(prompts(16, seed=7))
    ]

    async def all_of_them() -> list[list[TokenEvent]]:
        return await asyncio.gather(*(stream(runtime2, r, 0.05 * (i % 5)) for i, r in enumerate(reqs)))

    got = asyncio.run(all_of_them())
    for g, want in zip(got, local_run(tiny_dir, reqs), strict=True):
        assert_same(g, want)
        assert g[-1].finish_reason == "length"


def test_cancel_frees_kv_blocks(runtime2: Runtime) -> None:
    req = GenerateRequest(
        prompts(1, seed=9)[0], SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    )

    async def start_and_cancel() -> None:
        gen = runtime2.dispatcher.generate.options(num_returns="streaming").remote(req)
        for _ in range(3):
            await (await gen.__anext__())
        assert ray.get(runtime2.dispatcher.stats.remote())["kv_blocks_used"] > 0
        ray.cancel(gen)

    asyncio.run(start_and_cancel())
    for _ in range(100):
        stats = ray.get(runtime2.dispatcher.stats.remote())
        if stats["running"] == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert stats["running"] == 0 and stats["kv_blocks_used"] == 0


def test_too_long_prompt_is_a_clear_error(runtime2: Runtime) -> None:
    req = GenerateRequest(list(range(3, 600)), SamplingParams(max_tokens=4))
    with pytest.raises(Exception, match="maximum context length is 512 tokens"):
        runtime2.generate(req)
    assert runtime2.generate(GenerateRequest([5, 6, 7], SamplingParams(max_tokens=2)))[-1].finish_reason


def test_placement_must_cover_every_expert(ray_session: Any, tiny4_dir: Path) -> None:
    bad = Placement(slots=(((0, 1), (0, 1)), ((2,), (2, 3))))
    with pytest.raises(ValueError, match="layer 0.*expert 3|expert 3.*layer 0"):
        start_runtime(str(tiny4_dir), 2, ENGINE, placement=bad)
