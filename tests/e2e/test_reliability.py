"""Faults and overload lose nothing and hang nothing (issue 8).

A second app (`fault_app`, its own name and route prefix on the session's proxies) takes the kills,
so the shared `served_app` is never broken; the flood runs on `served_app` (max_waiting 32).
Oracles: the in-process model (`oracle`) for tokens; Ray's state API for replica processes;
Serve's status for replica counts; `psutil` for memory. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import ray
import torch

from moray.deploy.serve.config import ServerConfig
from moray.deploy.serve.state import shard_name
from moray.model.engine import GenerateRequest
from moray.model.sampling import SamplingParams

Oracle = Any  # conftest's `oracle` fixture
ServedApp = Any  # conftest's `served_app` fixture
pytestmark = pytest.mark.slow

FAULT_APP = "moray-faults"
TIMEOUT_S = 120.0
RECOVER_S = 120.0  # a killed replica is running again within this (Serve restarts it)
ERROR_EVENT_S = 30.0  # issue 8: a stream whose dispatcher died ends with an error event within this
BACK_S = 60.0  # issue 8: new requests succeed within this after the dispatcher was killed


@dataclass
class FaultApp:
    url: str  # http://127.0.0.1:PORT/moray-faults
    name: str
    config: ServerConfig

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


@contextmanager
def side_app(served_app: ServedApp, name: str, **settings: Any) -> Iterator[FaultApp]:
    """A small app of 2 shards (8 sequences, 128 tokens a step) beside `served_app`, on its proxies."""
    from ray import serve

    from moray.deploy.app import build_app

    config = served_app.config.model_copy(update={
        "app_name": name, "num_shards": 2, "max_num_seqs": 8, "max_batch_tokens": 128, "max_waiting": 16,
        "dispatcher_cpus": 0.5, "shard_cpus": 0.25, **settings})
    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    app = FaultApp(f"{served_app.http_url}/{name}", name, config)
    wait_healthy(app.url)
    yield app
    serve.delete(name)


@pytest.fixture(scope="module")
def fault_app(served_app: ServedApp) -> Iterator[FaultApp]:
    with side_app(served_app, FAULT_APP, resume_timeout_s=0.0) as app:  # resuming: moray-resume
        yield app


# ---- helpers ----------------------------------------------------------------------------------------
def wait_healthy(url: str, timeout_s: float = RECOVER_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f} s")


def replica_pids(app: str, deployment: str) -> list[int]:
    """Live replica processes of a deployment, from Ray's actor table in the GCS: what the state API
    (`ray.util.state.list_actors`) serves, read without its dashboard server, which a loaded machine
    sometimes leaves unanswered."""
    return [int(a["Pid"]) for a in live_replicas(app, deployment)]


def live_replicas(app: str, deployment: str) -> list[dict[str, Any]]:
    from ray._private import state

    actors = state.actors(actor_state_name="ALIVE").values()
    return [a for a in actors if a["ActorClassName"] == f"ServeReplica:{app}:{deployment}"]


def replica_actors(app: str, deployment: str) -> list[Any]:
    """Handles to the live replica actors of a deployment (Serve's own actors, in its namespace)."""
    return [ray.get_actor(a["Name"], namespace="serve") for a in live_replicas(app, deployment)]


def running_replicas(app: str, deployment: str) -> tuple[str, int]:
    from ray import serve

    d = serve.status().applications[app].deployments[deployment]
    running = {str(getattr(k, "value", k)): n for k, n in d.replica_states.items()}.get("RUNNING", 0)
    return str(getattr(d.status, "value", d.status)), int(running)


def wait_replaced(app: str, deployment: str, killed: int, replicas: int = 1) -> float:
    """Seconds until `deployment` is HEALTHY with `replicas` running replicas again, none of them `killed`."""
    start = time.monotonic()
    while time.monotonic() - start < RECOVER_S:
        status, running = running_replicas(app, deployment)
        pids = replica_pids(app, deployment)
        if status == "HEALTHY" and running == replicas and len(pids) == replicas and killed not in pids:
            return time.monotonic() - start
        time.sleep(0.5)
    now = running_replicas(app, deployment)
    raise AssertionError(f"{deployment} not back to {replicas} replica(s): {now}")


def kill(pid: int) -> float:
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def sse_payloads(lines: list[str]) -> list[Any]:
    return [line.removeprefix("data: ") if line == "data: [DONE]" else json.loads(line.removeprefix("data: "))
            for line in lines if line.startswith("data: ")]


@dataclass
class Stream:
    """One streamed completion as it arrives: tokens so far, its events, when it ended."""

    seen: int = 0  # data lines so far
    events: list[Any] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each data line arrived
    status: int | None = None
    ended_at: float | None = None

    def token_ids(self) -> list[int]:
        last = [e for e in self.events if isinstance(e, dict) and e.get("choices")
                and e["choices"][0].get("finish_reason")]
        return list(last[-1]["choices"][0].get("token_ids") or []) if last else []

    def text(self) -> str:
        chunks = [e for e in self.events if isinstance(e, dict) and e.get("choices")]
        return "".join(e["choices"][0]["text"] for e in chunks)

    def errors(self) -> list[dict[str, Any]]:
        return [e["error"] for e in self.events if isinstance(e, dict) and "error" in e]

    def longest_pause(self) -> float:
        """The longest time between two consecutive data lines."""
        return max((b - a for a, b in zip(self.times, self.times[1:], strict=False)), default=0.0)


async def consume(http: httpx.AsyncClient, url: str, body: dict[str, Any], out: Stream) -> None:
    async with http.stream("POST", f"{url}/completions", json={**body, "stream": True}) as r:
        out.status = r.status_code
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                out.events.extend(sse_payloads([line]))
                out.times.append(time.monotonic())
                out.seen += 1
    out.ended_at = time.monotonic()


async def with_streams(url: str, bodies: list[dict[str, Any]], victim: int, min_events: int = 2,
                       sig: int = signal.SIGKILL) -> tuple[list[Stream], float, list[int]]:
    """Stream every body; once each has `min_events` events, send `sig` to `victim`. Returns the streams,
    the signal's time, and each stream's event count then."""
    streams = [Stream() for _ in bodies]
    async with httpx.AsyncClient(timeout=TIMEOUT_S, limits=httpx.Limits(max_connections=64)) as http:
        tasks = [asyncio.create_task(consume(http, url, b, s)) for b, s in zip(bodies, streams, strict=True)]
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while min(s.seen for s in streams) < min_events:
                assert time.monotonic() < deadline, f"streams did not start: {[s.seen for s in streams]}"
                assert not any(t.done() for t in tasks), "a stream ended before the kill"
                await asyncio.sleep(0.01)
            at_kill = [s.seen for s in streams]
            killed_at = time.monotonic()
            os.kill(victim, sig)
            await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return streams, killed_at, at_kill


# ---- an expert replica dies mid-generation --------------------------------------------------------------
PROMPTS = [[1, 200 + 37 * i, 300 + i, 4000 + 11 * i] for i in range(8)]
KILL_TOKENS = 40


def test_killed_expert_replica_loses_no_tokens(fault_app: FaultApp, oracle: Oracle) -> None:
    """SIGKILL shard 0's only replica while 8 greedy streams generate: each stream still equals the
    in-process model token for token; Serve brings the shard back to one replica, and the dispatcher
    has a data-plane channel to it within `shard_timeout_s`."""
    from ray import serve

    dispatcher = serve.get_deployment_handle("dispatcher", fault_app.name)
    warm = httpx.post(f"{fault_app.base_url}/completions", json={"prompt": [1, 2], "max_tokens": 2},
                      timeout=60)
    assert warm.status_code == 200
    opened = dispatcher.stats.remote().result()["channels_opened"]  # one per shard replica by now
    assert opened >= 2
    wants = oracle([GenerateRequest(p, greedy(KILL_TOKENS)) for p in PROMPTS])
    (victim,) = replica_pids(fault_app.name, "expert-shard-0")
    bodies = [{"prompt": p, "max_tokens": KILL_TOKENS, "temperature": 0, "ignore_eos": True,
               "return_token_ids": True} for p in PROMPTS]
    streams, killed_at, at_kill = asyncio.run(with_streams(fault_app.base_url, bodies, victim))
    assert max(at_kill) < KILL_TOKENS, "the kill came after the streams had finished"
    for s, want in zip(streams, wants, strict=True):
        assert s.status == 200 and not s.errors(), s.errors()
        assert s.events[-1] == "[DONE]"
        assert s.token_ids() == [e.token_id for e in want]
        assert s.text() == "".join(e.text for e in want)
    finished_s = max(s.ended_at or 0.0 for s in streams) - killed_at
    back_s = wait_replaced(fault_app.name, "expert-shard-0", victim)
    stats = dispatcher.stats.remote().result()
    connected_s = time.monotonic() - killed_at
    assert stats["channels"] == [1, 1] and stats["channels_opened"] == opened + 1 and stats["shard_retries"]
    assert connected_s < fault_app.config.shard_timeout_s
    print(f"\nexpert replica killed: streams done {finished_s:.1f} s later, shard running again after "
          f"{back_s:.1f} s more, its new replica connected {connected_s:.1f} s after the kill")


# ---- an expert replica hangs mid-generation ---------------------------------------------------------------
HANG_APP = "moray-hangs"
HANG_TOKENS = 128
MAX_PAUSE_S = 5.0  # issue 20: with a healthy sibling replica, no stream waits longer between two tokens


@pytest.fixture(scope="module")
def hang_app(served_app: ServedApp) -> Iterator[FaultApp]:
    """2 expert shards x 2 replicas, so every shard has a sibling when one replica hangs."""
    with side_app(served_app, HANG_APP, shard_min_replicas=2, resume_timeout_s=0.0) as app:
        yield app


def dispatcher_stats(app: FaultApp) -> dict[str, Any]:
    from ray import serve

    return dict(serve.get_deployment_handle("dispatcher", app.name).stats.remote().result())


def wait_channels(app: FaultApp, want: list[int]) -> float:
    """Seconds until the dispatcher has `want` usable channels per shard (warming it with requests)."""
    start = time.monotonic()
    while (stats := dispatcher_stats(app))["channels"] != want:
        assert time.monotonic() - start < RECOVER_S, f"channels {stats['channels']}, want {want}"
        httpx.post(f"{app.base_url}/completions", json={"prompt": [1, 2], "max_tokens": 2}, timeout=60)
        time.sleep(0.2)
    return time.monotonic() - start


def hung_streams(app: FaultApp, oracle: Oracle, victim: int, min_events: int) -> tuple[list[Stream], float]:
    """8 greedy streams of HANG_TOKENS; SIGSTOP `victim` once each has `min_events` tokens. Every stream
    must end with the in-process model's tokens and no error event. Returns the streams and the stop's
    time."""
    wants = oracle([GenerateRequest(p, greedy(HANG_TOKENS)) for p in PROMPTS])
    bodies = [{"prompt": p, "max_tokens": HANG_TOKENS, "temperature": 0, "ignore_eos": True,
               "return_token_ids": True} for p in PROMPTS]
    streams, stopped_at, at_stop = asyncio.run(with_streams(app.base_url, bodies, victim, min_events,
                                                            signal.SIGSTOP))
    assert max(at_stop) < HANG_TOKENS, "the streams had finished before the replica hung"
    for s, want in zip(streams, wants, strict=True):
        assert s.status == 200 and not s.errors(), s.errors()
        assert s.events[-1] == "[DONE]" and s.token_ids() == [e.token_id for e in want]
    return streams, stopped_at


def resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # Serve replaced it (killed it) already


def test_a_hung_expert_replica_costs_a_pause_not_an_error(hang_app: FaultApp, oracle: Oracle) -> None:
    """SIGSTOP one of shard 0's two replicas while 8 streams are mid-way: its rows go to the sibling at
    the first missed deadline; every stream keeps its tokens and pauses < MAX_PAUSE_S; after SIGCONT the
    replica is back in use (or Serve replaced it) and the app is healthy."""
    wait_channels(hang_app, [2, 2])
    victim = replica_pids(hang_app.name, "expert-shard-0")[0]
    try:
        streams, stopped_at = hung_streams(hang_app, oracle, victim, min_events=HANG_TOKENS // 4)
        pause = max(s.longest_pause() for s in streams)
        assert pause < MAX_PAUSE_S
        faults = {(shard, kind): n for shard, kind, n in dispatcher_stats(hang_app)["shard_faults"]}
        assert faults.get((0, "hung"), 0) >= 1, faults
    finally:
        resume(victim)
    back_s = wait_channels(hang_app, [2, 2])
    wait_healthy(hang_app.url)
    print(f"\nhung replica with a sibling: longest pause {pause:.2f} s, streams done "
          f"{max(s.ended_at or 0.0 for s in streams) - stopped_at:.1f} s after the stop; both replicas of "
          f"shard 0 in use {back_s:.1f} s after SIGCONT")


def test_a_hung_only_replica_is_replaced_and_streams_finish(fault_app: FaultApp, oracle: Oracle) -> None:
    """The same with one replica per shard: the streams wait for the replica Serve starts when the hung
    one fails its health checks, and finish with the same tokens within `shard_timeout_s`."""
    wait_healthy(fault_app.url)
    wait_channels(fault_app, [1, 1])
    (victim,) = replica_pids(fault_app.name, "expert-shard-0")
    try:
        streams, stopped_at = hung_streams(fault_app, oracle, victim, min_events=16)
        pause = max(s.longest_pause() for s in streams)
        assert pause < fault_app.config.shard_timeout_s
        back_s = wait_replaced(fault_app.name, "expert-shard-0", victim)
    finally:
        resume(victim)
    print(f"\nhung only replica: longest pause {pause:.1f} s (Serve's health checks, then a new replica); "
          f"shard 0 healthy again {back_s:.1f} s later")


def test_a_shard_with_no_live_replica_fails_fast(fault_app: FaultApp, tiny_dir: Path) -> None:
    """`ShardedExperts` over the app's shard handles: equal to the in-process experts; with shard 0's
    replica dead and a short `shard_timeout_s`, a call fails with `ShardUnavailableError` once the
    timeout has passed (Serve's router would otherwise hold it until a replacement starts)."""
    from ray import serve

    from moray.actors.placement import Placement
    from moray.actors.sharded import HandleLinks, ShardedExperts, ShardUnavailableError
    from moray.model.config import MixtralConfig
    from moray.model.mixtral import load_local

    cfg = MixtralConfig.load(tiny_dir)
    handles = [serve.get_deployment_handle(shard_name(g), fault_app.name) for g in range(2)]
    timeout_s = 0.5
    sharded = ShardedExperts(Placement.round_robin(cfg.n_layers, cfg.n_experts, 2), HandleLinks(handles),
                             timeout_s)
    _, local = load_local(tiny_dir)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, cfg.dim, generator=gen)  # [T, D]
    ids = torch.stack([torch.randperm(cfg.n_experts, generator=gen)[:2] for _ in range(6)])  # [T, A]
    gates = torch.softmax(torch.randn(6, 2, generator=gen), -1)  # [T, A]
    want = asyncio.run(local(1, x, ids, gates))
    torch.testing.assert_close(asyncio.run(sharded(1, x, ids, gates)), want, rtol=1e-4, atol=1e-5)

    (victim,) = replica_pids(fault_app.name, "expert-shard-0")
    kill(victim)
    start = time.monotonic()
    with pytest.raises(ShardUnavailableError, match="shard 0"):
        asyncio.run(sharded(1, x, ids, gates))
    failed_s = time.monotonic() - start
    assert failed_s < timeout_s + 10.0
    print(f"\nshard 0 down, shard_timeout_s {timeout_s}: ShardUnavailableError after {failed_s:.2f} s")
    wait_replaced(fault_app.name, "expert-shard-0", victim)
    # The handles' routers learn of the replacement a moment after Serve reports it healthy: the
    # serving default (`ShardedExperts`'s own timeout) covers that gap; 0.5 s need not.
    recovered = ShardedExperts(sharded.placement, HandleLinks(handles))
    torch.testing.assert_close(asyncio.run(recovered(1, x, ids, gates)), want, rtol=1e-4, atol=1e-5)


# ---- the dispatcher dies mid-generation -------------------------------------------------------------------
def poll_until_served(url: str, since: float) -> list[tuple[float, int, float, httpx.Response]]:
    """POST small completions until one succeeds: (seconds after `since`, status, latency, response)."""
    seen = []
    while time.monotonic() - since < BACK_S + 30:
        t = time.monotonic()
        r = httpx.post(f"{url}/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=TIMEOUT_S)
        seen.append((t - since, r.status_code, time.monotonic() - t, r))
        if r.status_code == 200:
            break
        time.sleep(0.3)
    return seen


def test_killed_dispatcher_ends_streams_with_errors_then_recovers(fault_app: FaultApp) -> None:
    wait_healthy(fault_app.url)
    (victim,) = replica_pids(fault_app.name, "dispatcher")
    # 8 x 1000 tokens fit the KV cache together (max_num_seqs 8 x 1024 tokens), and outlast the kill
    bodies = [{"prompt": p, "max_tokens": 1000, "temperature": 0, "ignore_eos": True} for p in PROMPTS]
    streams, killed_at, _ = asyncio.run(with_streams(fault_app.base_url, bodies, victim))
    for s in streams:
        assert s.status == 200 and s.ended_at is not None
        assert s.ended_at - killed_at < ERROR_EVENT_S
        assert s.events[-1] == "[DONE]" and isinstance(s.events[-2], dict)
        error = s.events[-2]["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == 503, error
    errors_s = max(s.ended_at or 0.0 for s in streams) - killed_at
    health = httpx.get(f"{fault_app.url}/health", timeout=TIMEOUT_S)
    # Serve's own liveness check of the ingress replicas (three failures and Serve kills a replica with
    # its streams) passes while /health says 503: the ingress is alive, its dispatcher is not.
    ingress_alive = [ray.get(replica.check_health.remote(), timeout=TIMEOUT_S)
                     for replica in replica_actors(fault_app.name, "openai-ingress")]
    seen = poll_until_served(fault_app.base_url, killed_at)
    *refused, (served_s, status, _, ok) = seen
    assert status == 200 and served_s < BACK_S, [(round(t, 1), s) for t, s, _, _ in seen]
    assert ok.json()["usage"]["completion_tokens"] >= 1
    assert refused and health.status_code == 503, "no 503 while the dispatcher was down"
    assert ingress_alive == [None]
    for _, status, latency, r in refused:
        assert status == 503 and r.json()["error"]["code"] == 503 and r.headers["retry-after"], r.text
        assert latency < 10.0
    wait_replaced(fault_app.name, "dispatcher", victim)
    print(f"\ndispatcher killed: error events after {errors_s:.2f} s, {len(refused)} x 503, "
          f"served again after {served_s:.1f} s")


# ---- streams resume on a live dispatcher ------------------------------------------------------------------
RESUME_APP = "moray-resume"
RESUME_TOKENS = 80


@pytest.fixture(scope="module")
def resume_app(served_app: ServedApp) -> Iterator[FaultApp]:
    """Deterministic numerics (so seeded sampling continues exactly), resuming on (the default)."""
    with side_app(served_app, RESUME_APP, deterministic=True, resume_timeout_s=90.0) as app:
        yield app


def resume_bodies() -> list[dict[str, Any]]:
    """4 greedy and 4 seeded sampled streams, with logprobs and the usage chunk."""
    return [{"prompt": p, "max_tokens": RESUME_TOKENS, "ignore_eos": True, "return_token_ids": True,
             "logprobs": 1, "stream_options": {"include_usage": True},
             **({"temperature": 0} if i % 2 else {"temperature": 0.8, "seed": 100 + i})}
            for i, p in enumerate(PROMPTS)]


async def all_streams(url: str, bodies: list[dict[str, Any]]) -> list[Stream]:
    streams = [Stream() for _ in bodies]
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
        await asyncio.gather(*(consume(http, url, b, s) for b, s in zip(bodies, streams, strict=True)))
    return streams


def logprobs_of(s: Stream) -> list[float]:
    chunks = [e for e in s.events if isinstance(e, dict) and e.get("choices")]
    return [lp for e in chunks for lp in (e["choices"][0].get("logprobs") or {}).get("token_logprobs", [])]


def usage_of(s: Stream) -> dict[str, int]:
    return next(e["usage"] for e in s.events if isinstance(e, dict) and e.get("usage"))


def assert_resumed_equal(streams: list[Stream], wants: list[Stream]) -> None:
    for s, want in zip(streams, wants, strict=True):
        assert s.status == 200 and not s.errors(), s.errors()
        assert s.events[-1] == "[DONE]"
        assert len(s.token_ids()) == RESUME_TOKENS and s.token_ids() == want.token_ids()
        assert s.text() == want.text() and logprobs_of(s) == logprobs_of(want)
        assert usage_of(s) == usage_of(want) and usage_of(s)["completion_tokens"] == RESUME_TOKENS


def test_prompt_scores_do_not_depend_on_what_runs_beside(resume_app: FaultApp, teacher_forced: Any) -> None:
    """Deterministic mode, served: a prompt's teacher-forced scores (echo + logprobs) scored alone equal,
    bit for bit, its scores taken while streams prefill and decode beside it (128 tokens a step, so its
    prefill is chunked among theirs)."""
    tokens = [1, *((7 * i * i + 3 * i) % 31000 + 3 for i in range(299))]
    model = resume_app.config.served_model_name
    alone = teacher_forced(resume_app.base_url, model, tokens)
    bodies = [{**b, "max_tokens": 40, "stream_options": None} for b in resume_bodies()[:4]]

    async def beside() -> tuple[Any, list[Stream]]:
        scoring = asyncio.to_thread(teacher_forced, resume_app.base_url, model, tokens)
        scored, streams = await asyncio.gather(scoring, all_streams(resume_app.base_url, bodies))
        return scored, streams

    scored, streams = asyncio.run(beside())
    assert all(s.status == 200 and not s.errors() for s in streams)
    assert scored == alone


@pytest.mark.parametrize("replicas", [1, 2])
def test_streams_resume_when_their_dispatcher_dies(resume_app: FaultApp, replicas: int) -> None:
    """SIGKILL the dispatcher replica serving 8 streams (greedy and seeded): every stream finishes with
    no error event and equals, token for token, logprob for logprob, its run without a fault. One
    replica: the streams wait for Serve's replacement; two: they continue on the other one."""
    from ray import serve

    from moray.deploy.app import build_app

    if replicas != resume_app.config.dispatcher_replicas:
        resume_app.config = resume_app.config.model_copy(update={"dispatcher_replicas": replicas})
        serve.run(build_app(resume_app.config), name=RESUME_APP, route_prefix=f"/{RESUME_APP}")
        wait_replaced(RESUME_APP, "dispatcher", -1, replicas)
    bodies = resume_bodies()
    wants = asyncio.run(all_streams(resume_app.base_url, bodies))
    victim = replica_pids(RESUME_APP, "dispatcher")[0]
    streams, killed_at, at_kill = asyncio.run(with_streams(resume_app.base_url, bodies, victim, 10))
    assert max(at_kill) < RESUME_TOKENS, "the kill came after the streams had finished"
    assert_resumed_equal(streams, wants)
    done_s = max(s.ended_at or 0.0 for s in streams) - killed_at
    print(f"\ndispatcher killed ({replicas} replica(s)): 8 streams resumed and done {done_s:.1f} s later")


def read_across_a_kill(stream: Callable[[], Iterable[Any]], before: int = 10) -> list[Any]:
    """Read `stream()` on a thread; after `before` items SIGKILL every dispatcher replica of the resume
    app; return everything the stream gave once it ends."""
    import threading

    items: list[Any] = []
    reader = threading.Thread(target=lambda: items.extend(stream()))  # extend appends as items come
    reader.start()
    deadline = time.monotonic() + TIMEOUT_S
    while len(items) < before:
        assert time.monotonic() < deadline and reader.is_alive(), items
        time.sleep(0.01)
    for pid in replica_pids(RESUME_APP, "dispatcher"):
        kill(pid)
    reader.join(TIMEOUT_S)
    assert not reader.is_alive(), "the stream did not end"
    return items


def test_python_client_streams_resume(resume_app: FaultApp) -> None:
    """`MorayClient.stream` (through the ingress handle, no HTTP) pauses across a dispatcher's death and
    gives the text of the run without a fault."""

    from ray import serve

    from moray.deploy.api.client import MorayClient

    client = MorayClient(serve.get_app_handle(RESUME_APP), RESUME_APP)
    sampling = {"max_tokens": RESUME_TOKENS, "temperature": 0.8, "seed": 7, "ignore_eos": True}
    want = "".join(client.stream(PROMPTS[3], **sampling))
    pieces = read_across_a_kill(lambda: client.stream(PROMPTS[3], **sampling))
    assert "".join(pieces) == want


def test_grpc_streams_resume(resume_app: FaultApp) -> None:
    """moray's gRPC server in front of the app's ingress: a `GenerateStream` pauses across the dispatcher's
    death and gives the token ids and text of the run without a fault."""

    import grpc
    from ray import serve

    from moray.deploy.api import moray_pb2, moray_pb2_grpc
    from moray.deploy.api.grpc_server import GrpcServer
    from moray.deploy.serve.network import free_port

    port = free_port()
    server = GrpcServer("127.0.0.1", port, serve.get_app_handle(RESUME_APP)).start()
    request = moray_pb2.GenerateRequest(prompt_token_ids=moray_pb2.TokenIds(ids=PROMPTS[5]),
                                        max_tokens=RESUME_TOKENS, temperature=0.8, seed=11, ignore_eos=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = moray_pb2_grpc.MorayStub(channel)
            want = [(c.token_id, c.text) for c in stub.GenerateStream(request, timeout=TIMEOUT_S)]
            got = read_across_a_kill(lambda: (
                (c.token_id, c.text) for c in stub.GenerateStream(request, timeout=TIMEOUT_S)))
        assert len(want) == RESUME_TOKENS and got == want
    finally:
        server.stop()


def test_a_gone_client_is_not_resumed(resume_app: FaultApp) -> None:
    """A stream whose client left before the dispatcher died is not continued anywhere: the restarted
    dispatcher replicas never run a step."""
    from ray import serve

    async def leave_then_kill() -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
            body = {"prompt": PROMPTS[0], "max_tokens": 1000, "ignore_eos": True, "stream": True}
            async with http.stream("POST", f"{resume_app.base_url}/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # the client goes away after its first token
        await asyncio.sleep(0.5)
        for pid in replica_pids(RESUME_APP, "dispatcher"):
            kill(pid)

    asyncio.run(leave_then_kill())
    wait_healthy(resume_app.url)
    dispatchers = serve.get_deployment_handle("dispatcher", RESUME_APP)
    seen = []
    for _ in range(10):  # over 3 s, through Serve's router: every replica answers some of these
        stats = dispatchers.stats.remote().result()
        seen.append((stats["pid"], stats["time_steps"], stats["running"] + stats["waiting"]))
        time.sleep(0.3)
    assert all(steps == 0 and queued == 0 for _, steps, queued in seen), seen


# ---- a flood --------------------------------------------------------------------------------------------
FLOOD, FLOOD_TOKENS, DISTINCT = 200, 6, 16
FLOOD_PROMPTS = [PROMPTS[i % 8][:3] + [5000 + i % DISTINCT] for i in range(FLOOD)]  # 16 distinct


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def flood(app: ServedApp) -> tuple[list[tuple[httpx.Response, float]], list[tuple[int, float]],
                                         list[dict[str, Any]]]:
    """FLOOD completions at once while /health and /v1/moray/status are polled."""
    done = asyncio.Event()
    health: list[tuple[int, float]] = []
    engine: list[dict[str, Any]] = []

    async def one(http: httpx.AsyncClient, i: int) -> tuple[httpx.Response, float]:
        body = {"prompt": FLOOD_PROMPTS[i], "max_tokens": FLOOD_TOKENS,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        t = time.monotonic()
        r = await http.post(f"{app.base_url}/completions", json=body)
        return r, time.monotonic() - t

    async def watch(http: httpx.AsyncClient) -> None:
        while not done.is_set():
            t = time.monotonic()
            r = await http.get(f"{app.http_url}/health", timeout=30)
            health.append((r.status_code, time.monotonic() - t))
            s = await http.get(f"{app.base_url}/moray/status", timeout=30)
            engine.append(s.json()["dispatcher"])
            await asyncio.sleep(0.2)

    limits = httpx.Limits(max_connections=FLOOD + 8)
    async with httpx.AsyncClient(timeout=TIMEOUT_S * 2, limits=limits) as http:
        watcher = asyncio.create_task(watch(http))
        responses = await asyncio.gather(*(one(http, i) for i in range(FLOOD)))
        done.set()
        await watcher
    return responses, health, engine


def test_flood_gets_fast_429s_and_every_accepted_request_is_right(served_app: ServedApp,
                                                                   oracle: Oracle) -> None:
    cfg = served_app.config
    wants = {tuple(p): [e.token_id for e in events] for p, events in
             zip(FLOOD_PROMPTS[:DISTINCT],
                 oracle([GenerateRequest(p, greedy(FLOOD_TOKENS)) for p in FLOOD_PROMPTS[:DISTINCT]]),
                 strict=True)}
    status = httpx.get(f"{served_app.base_url}/moray/status", timeout=30).json()
    dispatcher_pid = int(status["dispatcher"]["pid"])
    (ingress_pid,) = replica_pids(served_app.app_name, "openai-ingress")
    before = {pid: rss_mb(pid) for pid in (dispatcher_pid, ingress_pid)}
    responses, health, engine = asyncio.run(flood(served_app))

    ok = [(r, s) for r, s in responses if r.status_code == 200]
    busy = [(r, s) for r, s in responses if r.status_code == 429]
    assert len(ok) + len(busy) == FLOOD, sorted({r.status_code for r, _ in responses})
    assert busy and len(ok) >= cfg.max_waiting
    for r, _ in busy:
        assert r.headers["retry-after"] and r.json()["error"]["code"] == 429
    for (r, _), p in zip(responses, FLOOD_PROMPTS, strict=True):
        if r.status_code == 200:
            assert r.json()["choices"][0]["token_ids"] == wants[tuple(p)]
    slowest_429 = max(s for _, s in busy)
    assert slowest_429 < 15.0, f"a 429 took {slowest_429:.1f} s"
    assert health and all(status == 200 for status, _ in health), health
    assert max(s for _, s in health) < 10.0
    assert max(int(e["waiting"]) for e in engine) <= cfg.max_waiting
    assert max(int(e["running"]) for e in engine) <= cfg.max_num_seqs
    growth = {pid: rss_mb(pid) - mb for pid, mb in before.items()}
    assert max(growth.values()) < 200.0, growth
    median_ok, median_429 = (sorted(s for _, s in group)[len(group) // 2] for group in (ok, busy))
    print(f"\nflood: {len(ok)} x 200 (median {median_ok:.1f} s), {len(busy)} x 429 (median "
          f"{median_429:.2f} s, slowest {slowest_429:.2f} s), /health slowest "
          f"{max(s for _, s in health):.2f} s, RSS growth MB {growth}")


# ---- GET /v1/moray/routing ------------------------------------------------------------------------------
def test_routing_counts_what_the_in_process_router_chose(served_app: ServedApp, tiny_dir: Path) -> None:
    """One request's change to `/v1/moray/routing` equals the in-process model's router choices over the
    tokens the engine ran (the prompt, then every generated token but the last); the prompt is shorter
    than a KV block, so the prefix cache cannot skip any of it."""
    import numpy as np

    from moray.deploy.routing import expert_counts, record_routing
    from moray.model.mixtral import load_local

    def routing() -> dict[str, Any]:
        r = httpx.get(f"{served_app.base_url}/moray/routing", timeout=TIMEOUT_S)
        assert r.status_code == 200, r.text
        return dict(r.json())

    prompt, max_tokens = [1, 7777, 8888, 9999, 1234], 6
    before = routing()
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    r = httpx.post(f"{served_app.base_url}/completions", json=body, timeout=TIMEOUT_S)
    after = routing()
    generated = r.json()["choices"][0]["token_ids"]
    model, experts = load_local(tiny_dir)
    cfg = model.cfg
    want = expert_counts(record_routing(model, experts, prompt + generated[:-1]), cfg.n_experts)  # [L, E]
    delta = np.asarray(after["counts"]) - np.asarray(before["counts"])  # [L, E]
    assert (after["layers"], after["experts"], after["shards"]) == (cfg.n_layers, cfg.n_experts, 2)
    assert delta.tolist() == want.tolist()
    assert after["assignments"] == np.asarray(after["counts"]).sum(axis=1).tolist()
