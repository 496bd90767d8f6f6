"""Token-load autoscaling: the policies as pure functions on Serve's own AutoscalingContext, the config
accepted by Serve, the policy run through Serve's wrapper, and the replicas' sliding-window counter."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from ray.serve import autoscaling_policy as policy_mod
from ray.serve._private import autoscaling_state as state_mod
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from moray.deploy.serve.autoscaling import (
    SEQUENCES_METRIC,
    TOKENS_METRIC,
    SequencesPolicy,
    TokensPolicy,
    TokenWindow,
    autoscaling_config,
    expert_metric,
    parse_expert_metric,
    sequences_policy,
    tokens_policy,
)

DEP = DeploymentID(name="expert-shard-0", app_name="moray")
Policy = Callable[[AutoscalingContext], tuple[int, dict[str, Any]]]


def make_ctx(replicas: int, *, metrics: dict[str, Sequence[float]] | None = None, lo: int = 1, hi: int = 8,
             state: dict[str, Any] | None = None, t: float = 0.0, requests: float = 0.0,
             config: AutoscalingConfig | None = None) -> AutoscalingContext:
    """Serve's real context: `metrics[name]` lists one aggregated value per running replica."""
    running = [ReplicaID(unique_id=f"r{i}", deployment_id=DEP) for i in range(replicas)]
    aggregated = {name: dict(zip(running, values, strict=True)) for name, values in (metrics or {}).items()}
    cfg = config or AutoscalingConfig(**autoscaling_config("tokens", min_replicas=lo, max_replicas=hi))
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name, current_num_replicas=replicas,
        target_num_replicas=replicas, running_replicas=running, total_num_requests=requests,
        total_queued_requests=0.0, aggregated_metrics=aggregated, raw_metrics=None,
        capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi, policy_state=state or {},
        last_scale_up_time=None, last_scale_down_time=None, current_time=t, config=cfg)


def spread(total: float, replicas: int) -> list[float]:
    """Per-replica tokens/s summing to `total` (uneven on purpose: only the sum may matter)."""
    weights = [i + 1 for i in range(replicas)]
    return [total * w / sum(weights) for w in weights]


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def time(self) -> float:
        return self.t


def simulate(policy: Policy, load: Callable[[float], float], *, start: int, seconds: float, lo: int = 1,
             hi: int = 8, tick: float = 0.5, metric: str = TOKENS_METRIC,
             config: AutoscalingConfig | None = None,
             clock: FakeClock | None = None) -> list[tuple[float, int]]:
    """Serve's control loop in miniature: each tick, context in, (replicas, state) out; new replicas
    are running by the next tick. Returns (time, replicas) after each tick."""
    replicas, history = start, []
    state: dict[str, Any] = {}
    for step in range(int(seconds / tick) + 1):
        t = step * tick
        if clock is not None:
            clock.t = t
        ctx = make_ctx(replicas, metrics={metric: spread(load(t), replicas)}, lo=lo, hi=hi, state=state, t=t,
                       config=config)
        replicas, state = policy(ctx)
        history.append((t, replicas))
    return history


def first_time(history: list[tuple[float, int]], replicas: int, after: float = 0.0) -> float | None:
    return next((t for t, n in history if n == replicas and t >= after), None)


def changes(history: list[tuple[float, int]]) -> int:
    return sum(a[1] != b[1] for a, b in zip(history[:-1], history[1:], strict=True))


TOKENS = TokensPolicy(target_tokens_per_s=100.0, upscale_delay_s=5.0, downscale_delay_s=30.0)


# ---- the policy as a pure function -----------------------------------------------------------------
def test_scales_up_to_ceil_load_over_target_after_the_delay() -> None:
    history = simulate(TOKENS, lambda t: 0.0 if t < 10 else 350.0, start=1, seconds=40)
    assert all(n == 1 for t, n in history if t < 15)  # the wish starts at t=10, delay 5 s
    assert first_time(history, math.ceil(350 / 100)) == 15.0
    assert history[-1][1] == 4 and changes(history) == 1


def test_scale_up_needs_the_wish_to_last() -> None:
    spike = simulate(TOKENS, lambda t: 900.0 if 10 <= t < 14 else 50.0, start=1, seconds=40)
    assert changes(spike) == 0  # 4 s of load < 5 s delay


def test_respects_max_and_min() -> None:
    assert simulate(TOKENS, lambda t: 1e6, start=1, seconds=10, hi=3)[-1][1] == 3
    assert simulate(TOKENS, lambda t: 0.0, start=2, seconds=100, lo=2)[-1][1] == 2
    n, _ = TOKENS(make_ctx(1, metrics={TOKENS_METRIC: [250.0]}, lo=3, hi=5, t=0.0))
    assert 3 <= n <= 5


def test_scales_down_only_after_the_down_delay() -> None:
    history = simulate(TOKENS, lambda t: 390.0 if t < 10 else 50.0, start=4, seconds=60)
    assert all(n == 4 for t, n in history if t < 40)  # load fell at t=10; delay 30 s
    assert first_time(history, 1) == 40.0 and changes(history) == 1


def test_scale_down_keeps_a_margin() -> None:
    """At 3 replicas of 100 tokens/s, 170 tokens/s would fit 2 only at 85% each: hold (margin 20%)."""
    assert simulate(TOKENS, lambda t: 170.0, start=3, seconds=100)[-1][1] == 3
    assert simulate(TOKENS, lambda t: 150.0, start=3, seconds=100)[-1][1] == 2  # 75% each: fits


def test_zero_load_goes_to_the_minimum() -> None:
    history = simulate(TOKENS, lambda t: 0.0, start=5, seconds=40, lo=1)
    assert history[-1][1] == 1 and first_time(history, 1) == 30.0


@pytest.mark.parametrize("start", [2, 3])
def test_no_flapping_around_a_threshold(start: int) -> None:
    """Load oscillating around 200 tokens/s (= 2 replicas' worth), faster than the up delay."""
    history = simulate(TOKENS, lambda t: 210.0 if int(t) % 4 < 2 else 190.0, start=start, seconds=300)
    assert changes(history) == 0


def test_slow_oscillation_scales_up_once_and_stays() -> None:
    """Minute-long swings between 260 and 180 tokens/s (longer than both delays): 180 fits 2 replicas
    only at 90% each, so once at 3 replicas the margin keeps it there."""
    history = simulate(TOKENS, lambda t: 260.0 if int(t / 60) % 2 == 0 else 180.0, start=2, seconds=480)
    assert changes(history) == 1 and history[-1][1] == 3


def test_scales_to_the_most_conservative_wish_of_the_delay() -> None:
    rising = simulate(TOKENS, lambda t: 250.0 if t < 3 else 450.0, start=1, seconds=30)
    assert first_time(rising, 3) == 5.0  # wished 3, then 5: takes 3 first ...
    assert first_time(rising, 5) == 10.5 and rising[-1][1] == 5  # ... then 5, a fresh delay after
    falling = simulate(TOKENS, lambda t: 50.0 if t < 10 else 200.0, start=5, seconds=31)
    assert first_time(falling, 3) == 30.0 and first_time(falling, 1) is None  # wished 1, then 3: takes 3


def test_no_metric_yet_holds() -> None:
    n, state = TOKENS(make_ctx(3, metrics={}, t=100.0))
    assert (n, state) == (3, {})


def test_only_the_sum_over_replicas_counts() -> None:
    one = TOKENS(make_ctx(2, metrics={TOKENS_METRIC: [300.0, 0.0]}, t=0.0))
    other = TOKENS(make_ctx(2, metrics={TOKENS_METRIC: [150.0, 150.0]}, t=0.0))
    assert one == other and one[1]["moray.bound"] == 3


def test_time_comes_from_the_context_or_the_override() -> None:
    n1, s1 = tokens_policy(make_ctx(1, metrics={TOKENS_METRIC: [500.0]}, t=1000.0), target_tokens_per_s=100.0,
                           upscale_delay_s=5.0)
    assert n1 == 1 and s1["moray.since"] == 1000.0
    n2, _ = tokens_policy(make_ctx(1, metrics={TOKENS_METRIC: [500.0]}, state=s1, t=1004.0),
                          target_tokens_per_s=100.0, upscale_delay_s=5.0, now=1005.0)
    assert n2 == 5


def test_custom_metric_name() -> None:
    policy = TokensPolicy(target_tokens_per_s=10.0, upscale_delay_s=0.0, metric="rows_per_s")
    assert policy(make_ctx(1, metrics={"rows_per_s": [35.0], TOKENS_METRIC: [0.0]}))[0] == 4


def test_sequences_policy_uses_the_metric_then_requests() -> None:
    ctx = make_ctx(1, metrics={SEQUENCES_METRIC: [40.0]}, requests=3.0)
    assert sequences_policy(ctx, target_seqs_per_replica=16.0, upscale_delay_s=0.0)[0] == 3
    fallback = make_ctx(1, metrics={}, requests=33.0)
    assert SequencesPolicy(target_seqs_per_replica=16.0, upscale_delay_s=0.0)(fallback)[0] == 3
    policy = SequencesPolicy(target_seqs_per_replica=8.0, upscale_delay_s=2.0, downscale_delay_s=10.0)
    history = simulate(policy, lambda t: 30.0 if t < 20 else 2.0, start=1, seconds=40,
                       metric=SEQUENCES_METRIC)
    assert first_time(history, 4) == 2.0 and first_time(history, 1, after=20.0) == 30.0


# ---- Serve's side ----------------------------------------------------------------------------------
def test_config_is_what_serve_accepts() -> None:
    from ray import serve

    cfg = autoscaling_config("tokens", min_replicas=1, max_replicas=4, initial_replicas=2,
                             policy_kwargs={"target_tokens_per_s": 500.0, "upscale_delay_s": 2.0})
    parsed = AutoscalingConfig(**cfg)
    assert (parsed.min_replicas, parsed.max_replicas, parsed.initial_replicas) == (1, 4, 2)
    assert parsed.upscale_delay_s == 0.0 and parsed.downscale_delay_s == 0.0
    assert parsed.policy.policy_function == "moray.deploy.serve.autoscaling:TokensPolicy"
    assert parsed.policy.policy_kwargs == {"target_tokens_per_s": 500.0, "upscale_delay_s": 2.0}
    assert parsed.policy.get_policy().__name__ == "TokensPolicy"  # cloudpickled by value, loads back

    @serve.deployment(autoscaling_config=autoscaling_config("sequences", min_replicas=1, max_replicas=2))
    class Dispatcher:
        pass

    policy = Dispatcher._deployment_config.autoscaling_config.policy  # type: ignore[attr-defined]
    assert policy.policy_function.endswith(":SequencesPolicy")


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="bad policy_kwargs for the 'tokens' policy"):
        autoscaling_config("tokens", min_replicas=1, max_replicas=2, policy_kwargs={"target_tokens": 1.0})
    with pytest.raises(ValueError, match="max_replicas"):
        AutoscalingConfig(**autoscaling_config("tokens", min_replicas=3, max_replicas=2))


def serve_wrapped(cfg: dict[str, Any]) -> Policy:
    """The policy as Serve's controller runs it: resolved (class + policy_kwargs) and wrapped with
    Serve's own scaling factors, delays and bounds (Ray 2.60 private helpers)."""
    parsed = AutoscalingConfig(**cfg)
    return policy_mod._apply_autoscaling_config(state_mod._resolve_policy_callable(parsed.policy))


def test_policy_kwargs_reach_the_policy_inside_serve() -> None:
    kwargs = {"target_tokens_per_s": 50.0, "upscale_delay_s": 3.0, "downscale_delay_s": 10.0}
    cfg = autoscaling_config("tokens", min_replicas=1, max_replicas=8, policy_kwargs=kwargs)
    policy = serve_wrapped(cfg)
    history = simulate(policy, lambda t: 0.0 if t < 5 else 260.0, start=1, seconds=40,
                       config=AutoscalingConfig(**cfg))
    assert first_time(history, math.ceil(260 / 50)) == 8.0  # our 3 s delay, nothing added by Serve


def test_serve_delays_would_stack_on_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the builder zeroes Serve's delays: left non-zero they add to the policy's."""
    clock = FakeClock()
    # Serve's delay logic reads the wall clock (time.time()), not ctx.current_time
    monkeypatch.setattr(policy_mod, "time", clock)
    cfg = autoscaling_config("tokens", min_replicas=1, max_replicas=8,
                             policy_kwargs={"target_tokens_per_s": 50.0, "upscale_delay_s": 3.0})
    cfg.update(upscale_delay_s=30.0)
    history = simulate(serve_wrapped(cfg), lambda t: 0.0 if t < 5 else 260.0, start=1, seconds=60,
                       config=AutoscalingConfig(**cfg), clock=clock)
    assert first_time(history, 6) == 5.0 + 3.0 + 30.0


# ---- the replica side ------------------------------------------------------------------------------

def test_token_window_rates() -> None:
    clock = FakeClock()
    window = TokenWindow(window_s=10.0, bucket_s=0.5, clock=clock)
    for _ in range(300):  # 30 s at 10 calls/s: expert 1 of layer 0 gets 7 tokens a call, expert 3 gets 3
        clock.t += 0.1
        window.record(0, [0, 7, 0, 3])
        window.record(2, {5: 2})
    assert window.rate() == pytest.approx(120.0, rel=0.03)
    rates = window.rates()
    assert set(rates) == {(0, 1), (0, 3), (2, 5)}
    assert rates[(0, 1)] == pytest.approx(70.0, rel=0.03) and rates[(2, 5)] == pytest.approx(20.0, rel=0.03)
    stats = window.stats()
    assert stats[TOKENS_METRIC] == pytest.approx(120.0, rel=0.03)
    assert {parse_expert_metric(k) for k in stats} - {None} == {(0, 1), (0, 3), (2, 5)}
    assert all(isinstance(v, float) for v in stats.values())  # what Serve's replica validates
    clock.t += 10.5
    assert window.rate() == 0.0 and window.rates() == {}


def test_token_window_young_and_sliding() -> None:
    clock = FakeClock()
    window = TokenWindow(window_s=10.0, bucket_s=1.0, clock=clock)
    clock.t += 2.0
    window.record(0, [40])
    assert window.rate() == pytest.approx(20.0)  # 40 tokens in the 2 s since start, not over 10 s
    clock.t += 6.0
    window.record(0, [40])
    assert window.rate() == pytest.approx(10.0)  # 80 in 8 s
    clock.t += 5.0  # the first 40 left the window; the second is 5 s old
    assert window.rate() == pytest.approx(40 / 9.0)  # kept: 9 whole 1-s buckets and the current one
    assert window.stats(per_expert=False) == {TOKENS_METRIC: window.rate()}


def test_token_window_is_thread_safe() -> None:
    window = TokenWindow(window_s=3600.0, bucket_s=1.0)

    def hammer() -> None:
        for _ in range(2000):
            window.record(1, [1, 1])

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sum(window.rates().values()) == pytest.approx(window.rate())
    assert window.rate() * window._span(window.clock()) == pytest.approx(4 * 2000 * 2)


def test_expert_metric_names_round_trip() -> None:
    assert parse_expert_metric(expert_metric(31, 7)) == (31, 7)
    assert parse_expert_metric(TOKENS_METRIC) is None and parse_expert_metric("tokens_per_s.l1") is None
