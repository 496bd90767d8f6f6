"""Expert load balancing, served: a router biased toward one expert makes one shard hot.

One scenario (a module fixture) runs the app with autoscaling on 3 expert shards of a tiny model
whose router sends most tokens to expert 0. The model routes top-1, not Mixtral's top-2: with top-2
one expert can take at most half of the assignments, so the hot shard would carry only ~3x a cold
one's tokens, and a fixed per-replica target would have to be tuned to this machine's speed; at
~8x the target sits between hot and cold with a wide margin either way. A burst of concurrent
requests runs until the hot shard has had 2 replicas for a while, then short requests, one at a time
with a fixed pause between them (a load that does not grow with the server's speed), keep running
while it scales back. `moray status --stats-out` runs in the middle of the burst (both hot
replicas alive, so no counts are lost).

The tests then check: the hot shard went 1 -> 2 -> 1 and the cold ones stayed at 1; both hot
replicas served tokens (their own counters grew); every request, through the transitions, returned
the in-process model's greedy tokens; `moray status` saw it; the planner balances the recorded
load, and the app serving the planned placement (redundant copies of expert 0) answers the same.

The apps run on the session's Ray and Serve (started by the `served_app` fixture, so Serve's HTTP
proxy is on a free port) under their own name and route prefix, and are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from moray.deploy.cli.status import format_status
from moray.deploy.serve.config import ServerConfig
from moray.model.engine import GenerateRequest
from moray.model.sampling import SamplingParams

pytestmark = pytest.mark.slow

SPEC = {"layers": 2, "dim": 64, "heads": 4, "kv_heads": 2, "experts": 8, "hidden": 128, "seed": 7, "top_k": 1}
BIAS = 2.0  # expert 0's logit boost: it gets ~80% of the tokens
HOT_EXPERT, NUM_SHARDS = 0, 3
HOT, COLD = "expert-shard-0", ["expert-shard-1", "expert-shard-2"]
PROMPTS = ["The quick brown fox", "Once upon a time", "In 1905, a clerk in Bern", "Rain fell on the",
           "My favourite colour is", "def fibonacci(n):", "The capital of France", "Three little pigs"]
MAX_TOKENS = 16
APP, PREFIX, MODEL = "moray-lb", "/lb", "moray-biased"
BURST_WORKERS, TRICKLE_WORKERS = 16, 1
# Expert tokens/s per replica (prompt tokens count too). Measured here (2 cores): under the burst the
# hot shard serves 350-610 tokens/s, the cold ones 55-70 and ~30. One request at a time back to back
# would give the hot shard whatever one sequence runs at, which the transport decides (95-115 over
# Ray calls, 170-290 over the data plane: above 0.8 x target, so it never scaled down). The trickle
# therefore pauses TRICKLE_PAUSE_S after each request: a request routes ~16 tokens to the hot shard
# (~10 positions x 2 layers x ~80%), so it stays under 16 / TRICKLE_PAUSE_S = 64 tokens/s however fast
# the server is. Margins: up (hot / target 1.8-3), down (0.8 target / trickle >= 2.5), the cold
# shards stay (target / cold ~3).
TARGET = 200.0
TRICKLE_TOKENS = 4
TRICKLE_PAUSE_S = 0.25
SPLIT_S, READY_S, SCALE_S = 6.0, 180.0, 90.0
TIMEOUT_S = 120.0


# ---- the model and its oracle ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def biased_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moray.model.tiny import TinySpec, make_tiny

    return make_tiny(tmp_path_factory.mktemp("biased"), TinySpec(**SPEC), router_bias={HOT_EXPERT: BIAS})


@pytest.fixture(scope="module")
def expected(biased_dir: Path) -> dict[str, list[int]]:
    """Greedy token ids of every prompt from the in-process model (every expert local), each alone."""
    from moray.model.engine import AsyncEngine, EngineConfig
    from moray.model.mixtral import load_local
    from moray.model.tokenizer import Tokenizer

    model, experts = load_local(biased_dir)
    tokenizer = Tokenizer.from_model_dir(biased_dir)
    engine = AsyncEngine(model, experts, tokenizer, EngineConfig(max_num_seqs=1))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)

    async def alone(prompt: str) -> list[int]:
        request = GenerateRequest(tokenizer.encode(prompt, bos=True), params)
        return [e.token_id async for e in engine.generate(request)]

    async def each_alone() -> dict[str, list[int]]:
        return {p: await alone(p) for p in PROMPTS}

    return asyncio.run(each_alone())


# ---- deploying ------------------------------------------------------------------------------------------
def lb_config(model: Path, **overrides: Any) -> ServerConfig:
    base: dict[str, Any] = dict(model=str(model), served_model_name=MODEL, app_name=APP,
                                num_shards=NUM_SHARDS,
                                max_num_seqs=32, max_batch_tokens=512, max_waiting=64, api_key=None,
                                shard_cpus=0.5, dispatcher_cpus=1.0, torch_threads=1)  # as served_app
    return ServerConfig(**{**base, **overrides})


def deploy(config: ServerConfig, http_url: str) -> str:
    """Run (or update) the app `APP` at `PREFIX` on the session's Serve; its URL once healthy."""
    from ray import serve

    from moray.deploy import app as app_module

    serve.run(app_module.build_app(config), name=APP, route_prefix=PREFIX, blocking=False)
    url = f"{http_url}{PREFIX}"
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200 and _ready(config):
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {READY_S:.0f} s")


def _ready(config: ServerConfig) -> bool:
    from ray import serve

    app = serve.status().applications.get(APP)
    return app is not None and str(getattr(app.status, "value", app.status)) == "RUNNING"


def undeploy() -> None:
    from ray import serve

    if APP in serve.status().applications:
        serve.delete(APP)


def running_replicas() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return {}
    return {name: sum(n for state, n in d.replica_states.items() if _value(state) == "RUNNING")
            for name, d in app.deployments.items() if name.startswith("expert-shard-")}


def _value(state: Any) -> str:
    return str(getattr(state, "value", state))


def shard_rates() -> dict[str, float]:
    """Tokens/s per shard deployment (summed over its replicas), from the replicas' load reports."""
    from moray.deploy.serve.state import shard_reports

    return {f"expert-shard-{g}": sum(r["tokens_per_s"] for r in shard_reports(APP, f"expert-shard-{g}", 10.0))
            for g in range(NUM_SHARDS)}


def replica_tokens(shard: str) -> dict[str, int]:
    """replica id -> tokens served so far, for every live replica of `shard`."""
    from moray.deploy.serve.state import shard_reports

    return {r["replica"]: r["tokens_total"] for r in shard_reports(APP, shard, 10.0)}


# ---- watching -------------------------------------------------------------------------------------------
@dataclass
class Timeline:
    """RUNNING replicas per shard every 0.5 s and token rates every 3 s, polled in threads."""

    start: float = field(default_factory=time.monotonic)
    points: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    rates: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def now(self) -> float:
        return time.monotonic() - self.start

    def watch(self) -> None:
        threading.Thread(target=self._poll, args=(running_replicas, self.points, 0.5), daemon=True).start()
        threading.Thread(target=self._poll, args=(shard_rates, self.rates, 3.0), daemon=True).start()

    def _poll(self, read: Callable[[], dict[str, Any]], into: list[Any], every_s: float) -> None:
        while not self.stop.is_set():
            try:
                into.append((round(self.now(), 1), {k: round(v) for k, v in read().items()}))
            except Exception:  # noqa: BLE001 - a controller hiccup or a replica starting: poll again
                pass
            self.stop.wait(every_s)

    def latest(self, shard: str) -> int:
        return self.points[-1][1].get(shard, 0) if self.points else 0

    def held_for(self, shard: str, n: int) -> float:
        """Seconds `shard` has had n replicas without a break (0 when it has not now)."""
        since = None
        for t, counts in self.points:
            since = (since if since is not None else t) if counts.get(shard, 0) == n else None
        return 0.0 if since is None else self.points[-1][0] - since

    def changes(self) -> list[tuple[float, dict[str, int]]]:
        out: list[tuple[float, dict[str, int]]] = []
        for t, counts in self.points:
            if not out or counts != out[-1][1]:
                out.append((t, counts))
        return out

    def first(self, shard: str, n: int, after: float = 0.0) -> float | None:
        return next((t for t, counts in self.points if t >= after and counts.get(shard) == n), None)


# ---- load -----------------------------------------------------------------------------------------------
@dataclass
class Done:
    prompt: str
    token_ids: list[int]
    start: float
    end: float


@dataclass
class Load:
    """Concurrent greedy completions cycling through PROMPTS, each worker until its stop event is set."""

    url: str
    clock: Callable[[], float]
    done: list[Done] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def worker(self, client: httpx.AsyncClient, i: int, stop: asyncio.Event,
                     requests: int | None = None, max_tokens: int = MAX_TOKENS, pause_s: float = 0.0) -> None:
        n = i
        while not stop.is_set() and (requests is None or n < i + requests):
            if n > i and pause_s:
                await asyncio.sleep(pause_s)
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 1
            body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}
            start = self.clock()
            try:
                r = await client.post(f"{self.url}/v1/completions", json=body, timeout=TIMEOUT_S)
            except httpx.HTTPError as e:
                self.errors.append(f"{prompt!r}: {type(e).__name__} {e}")
                continue
            if r.status_code != 200:
                self.errors.append(f"{prompt!r}: HTTP {r.status_code} {r.text[:200]}")
                continue
            self.done.append(Done(prompt, r.json()["choices"][0]["token_ids"], start, self.clock()))

    async def run(self, workers: int, stop: asyncio.Event, requests_each: int | None = None,
                  max_tokens: int = MAX_TOKENS, pause_s: float = 0.0) -> None:
        async with httpx.AsyncClient() as client:
            await asyncio.gather(*(self.worker(client, i, stop, requests_each, max_tokens, pause_s)
                                   for i in range(workers)))


async def until(check: Callable[[], bool], timeout_s: float, every_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(every_s)
    return False


def moray(*args: str, ray_address: str) -> subprocess.CompletedProcess[str]:
    """The `moray` CLI in a subprocess (a second Ray driver for `status`)."""
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "moray.deploy.cli", *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env)


# ---- the scenario ---------------------------------------------------------------------------------------
@dataclass
class Scenario:
    timeline: Timeline
    load: Load
    seen: dict[str, Any]
    status: subprocess.CompletedProcess[str]
    stats_file: Path


async def _burst(timeline: Timeline, load: Load, status_cmd: Callable[[], Any], seen: dict[str, Any]) -> None:
    burst, trickle = asyncio.Event(), asyncio.Event()
    burst_task = asyncio.create_task(load.run(BURST_WORKERS, burst))
    # The trickle runs through the scale-down too: short requests with a short pause between them, so
    # requests keep coming (gaps of TRICKLE_PAUSE_S) while the load stays well below the target.
    trickle_task = asyncio.create_task(load.run(TRICKLE_WORKERS, trickle, max_tokens=TRICKLE_TOKENS,
                                                pause_s=TRICKLE_PAUSE_S))
    seen["burst_start"] = timeline.now()
    seen["up"] = await until(lambda: timeline.latest(HOT) == 2, SCALE_S)
    if seen["up"]:
        await until(lambda: timeline.held_for(HOT, 2) >= 2.0, 30)
        seen["tokens_at_2"] = await asyncio.to_thread(replica_tokens, HOT)
        status = asyncio.create_task(asyncio.to_thread(status_cmd))
        await asyncio.sleep(SPLIT_S)
        seen["tokens_later"] = await asyncio.to_thread(replica_tokens, HOT)
        seen["status"] = await status
    burst.set()
    await burst_task
    seen["burst_end"] = timeline.now()
    seen["down"] = await until(lambda: timeline.latest(HOT) == 1, SCALE_S)
    await asyncio.sleep(2.0)
    trickle.set()
    await trickle_task


@pytest.fixture(scope="module")
def scenario(served_app: Any, biased_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    stats_file = tmp_path_factory.mktemp("lb") / "loads.json"
    config = lb_config(biased_dir, autoscaling=True, shard_min_replicas=1, shard_max_replicas=2,
                       target_tokens_per_replica_s=TARGET, upscale_delay_s=1.0, downscale_delay_s=4.0)
    try:
        url = deploy(config, served_app.http_url)
        timeline = Timeline()
        timeline.watch()
        load, seen = Load(url, timeline.now), dict[str, Any]()
        status_cmd = lambda: moray("status", "--json", "--app", APP, "--stats-out", str(stats_file),  # noqa: E731
                                   ray_address=served_app.ray_address)
        try:
            asyncio.run(_burst(timeline, load, status_cmd, seen))
        finally:
            timeline.stop.set()
        status = seen.get("status") or subprocess.CompletedProcess([], 1, "", "never ran: no scale-up")
        sys.stderr.write(f"\nload balancing: target {TARGET:.0f} tokens/s per replica, "
                         f"{len(load.done)} requests\n"
                         f"  replicas: {timeline.changes()}\n  burst {seen.get('burst_start')} -> "
                         f"{seen.get('burst_end')} s; rates: {timeline.rates}\n"
                         f"  hot replicas' tokens: {seen.get('tokens_at_2')} -> {seen.get('tokens_later')}\n")
        yield Scenario(timeline, load, seen, status, stats_file)
    finally:
        undeploy()


# ---- the checks -----------------------------------------------------------------------------------------
def test_hot_shard_scales_up_then_back_down(scenario: Scenario) -> None:
    tl = scenario.timeline
    assert scenario.seen["up"], f"the hot shard never got a second replica: {tl.changes()}"
    assert scenario.seen["down"], f"the hot shard never scaled back to 1: {tl.changes()}"
    up = tl.first(HOT, 2)
    assert up is not None and tl.first(HOT, 1, after=up) is not None


def test_cold_shards_stay_at_their_minimum(scenario: Scenario) -> None:
    assert scenario.seen["up"]
    for shard in COLD:
        seen = {counts.get(shard) for _, counts in scenario.timeline.points}
        assert seen == {1}, scenario.timeline.changes()


def test_both_hot_replicas_serve_tokens(scenario: Scenario) -> None:
    """Token splitting: with 2 replicas of the hot shard, each replica's own counter grows."""
    before, after = scenario.seen.get("tokens_at_2"), scenario.seen.get("tokens_later")
    assert before and after and len(after) == 2, (before, after)
    grew = {r: after[r] - before.get(r, 0) for r in after}
    assert all(n > 0 for n in grew.values()), grew
    assert min(grew.values()) > 0.25 * max(grew.values()), f"one replica took almost everything: {grew}"


def test_every_request_returns_the_in_process_tokens(scenario: Scenario,
                                                      expected: dict[str, list[int]]) -> None:
    load = scenario.load
    assert not load.errors, load.errors[:3]
    assert len(load.done) >= 3 * BURST_WORKERS
    wrong = [d.prompt for d in load.done if d.token_ids != expected[d.prompt][:len(d.token_ids)]
             or len(d.token_ids) not in (MAX_TOKENS, TRICKLE_TOKENS)]
    assert not wrong, f"{len(wrong)} of {len(load.done)} differ from the in-process model: {wrong[:4]}"


def test_requests_ran_through_both_transitions(scenario: Scenario) -> None:
    """Scaling drops no work: requests kept coming (no pause longer than the trickle's, plus slack for a
    loaded event loop) while each replica change happened (between the poll that saw it and the one
    before), and all of them came back (checked above)."""
    tl = scenario.timeline
    up = tl.first(HOT, 2)
    down = tl.first(HOT, 1, after=up or 0.0)
    assert up is not None and down is not None, tl.changes()
    for t in (up, down):
        before = max(p for p, _ in tl.points if p < t)
        assert covered(scenario.load.done, before, t, gap_s=2 * TRICKLE_PAUSE_S), \
            f"a gap in the requests around the change at {t} s"


def covered(done: list[Done], a: float, b: float, gap_s: float) -> bool:
    """Whether requests were in flight all through [a, b], but for gaps shorter than `gap_s`."""
    reach = a
    for d in sorted(done, key=lambda d: d.start):
        if d.start > reach + gap_s:
            break
        reach = max(reach, d.end)
    return reach >= b


def test_status_reports_replicas_and_token_rates(scenario: Scenario) -> None:
    out = scenario.status
    assert out.returncode == 0, out.stderr[-2000:]
    status = json.loads(out.stdout)
    deployments = status["deployments"]
    shards = {f"expert-shard-{g}" for g in range(NUM_SHARDS)}
    assert set(deployments) == {"openai-ingress", "dispatcher", *shards}
    assert deployments[HOT]["num_replicas"] == 2 and all(deployments[s]["num_replicas"] == 1 for s in COLD)
    live = ("HEALTHY", "UPSCALING", "DOWNSCALING")
    assert all(d["status"] in live for d in deployments.values()), deployments
    assert len(status["shards"][HOT]["replicas"]) == 2
    rates = np.asarray(status["experts"]["tokens_per_s"])  # [L, E]
    assert rates.shape == (SPEC["layers"], SPEC["experts"]) and (rates >= 0).all()
    assert (rates.argmax(axis=1) == HOT_EXPERT).all(), rates
    hot_rate = status["shards"][HOT]["tokens_per_s"]
    assert hot_rate > max(status["shards"][s]["tokens_per_s"] for s in COLD)
    table = format_status(status).splitlines()  # what `moray status` prints without --json
    hottest = table[table.index(next(line for line in table if line.startswith("LAYER"))) + 1].split()
    assert int(hottest[1]) == HOT_EXPERT


def test_stats_file_counts_match_the_replicas_and_the_router_bias(scenario: Scenario) -> None:
    from moray.actors.placement import load_stats

    assert scenario.status.returncode == 0, scenario.status.stderr[-2000:]
    tokens = load_stats(scenario.stats_file)  # [L, E]
    status = json.loads(scenario.status.stdout)
    per_replica = sum(r["tokens_total"] for s in status["shards"].values() for r in s["replicas"])
    assert tokens.sum() == per_replica
    share = tokens[:, HOT_EXPERT] / tokens.sum(axis=1)  # [L]
    assert (share > 0.6).all(), share  # the router bias: expert 0 takes most tokens at every layer


def gpu_load_ratio(placement: dict[str, Any], loads: np.ndarray) -> float:
    """max/mean tokens per GPU, averaged over layers, an expert's tokens split evenly over its copies
    (computed here from the placement file's JSON, apart from moray's own `gpu_loads`)."""
    shards = placement["shards"]  # [G][L] -> expert ids
    ratios = []
    for layer in range(loads.shape[0]):
        copies = np.zeros(loads.shape[1])
        for shard in shards:
            copies[shard[layer]] += 1
        per_gpu = [sum(loads[layer, e] / copies[e] for e in shard[layer]) for shard in shards]
        ratios.append(max(per_gpu) / np.mean(per_gpu))
    return float(np.mean(ratios))


def test_planner_balances_the_recorded_load(scenario: Scenario, tmp_path: Path) -> None:
    assert scenario.status.returncode == 0, scenario.status.stderr[-2000:]
    loads = json.loads(scenario.stats_file.read_text())
    tokens = np.asarray(loads["tokens"], dtype=np.float64)
    gpus, redundant = 4, 4
    round_robin = {"shards": [[[e for e in range(SPEC["experts"]) if e % gpus == g]] * SPEC["layers"]
                              for g in range(gpus)]}
    assert gpu_load_ratio(round_robin, tokens) >= 2.0
    out = tmp_path / "placement.json"
    run = moray("plan-placement", "--stats", str(scenario.stats_file), "--gpus", str(gpus), "--redundant",
                str(redundant), "--out", str(out), "--json", ray_address="")
    assert run.returncode == 0, run.stderr
    planned = json.loads(out.read_text())
    assert gpu_load_ratio(planned, tokens) <= 1.15
    for layer in range(SPEC["layers"]):
        placed = [e for shard in planned["shards"] for e in shard[layer]]
        assert set(placed) == set(range(SPEC["experts"])) and len(placed) == SPEC["experts"] + redundant
    report = json.loads(run.stdout)
    assert report["before"]["imbalance_mean"] == pytest.approx(gpu_load_ratio(round_robin, tokens))
    assert report["after"]["imbalance_mean"] == pytest.approx(gpu_load_ratio(planned, tokens))


def test_planned_placement_serves_the_same_tokens(scenario: Scenario, served_app: Any, biased_dir: Path,
                                                  expected: dict[str, list[int]], tmp_path: Path) -> None:
    """The app on a planned placement (2 shards, each with a copy of expert 0, whose tokens are dealt
    over both; it replaces the scenario's app) answers as the in-process model does."""
    assert scenario.status.returncode == 0, scenario.status.stderr[-2000:]
    placement = tmp_path / "placement.json"
    run = moray("plan-placement", "--stats", str(scenario.stats_file), "--gpus", "2", "--redundant", "2",
                "--out", str(placement), ray_address="")
    assert run.returncode == 0, run.stderr
    shards = json.loads(placement.read_text())["shards"]
    assert all(HOT_EXPERT in shard[layer] for shard in shards for layer in range(SPEC["layers"]))
    config = lb_config(biased_dir, placement=str(placement), num_shards=1)
    try:
        url = deploy(config, served_app.http_url)
        load = Load(url, time.monotonic)

        asyncio.run(load.run(len(PROMPTS), asyncio.Event(), requests_each=2))
        assert running_replicas().keys() == {"expert-shard-0", "expert-shard-1"}
    finally:
        undeploy()
    assert not load.errors, load.errors[:3]
    assert [d.prompt for d in load.done if d.token_ids != expected[d.prompt]] == []
