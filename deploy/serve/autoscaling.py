"""Serve deployment autoscaling on routed tokens (expert shards) and on sequences (dispatchers).

Serve's default policy counts ongoing requests, which is wrong for expert shards: every engine step
sends one request to every involved shard, so a hot shard and a cold one see the same request
count. Each shard replica instead reports the expert-token pairs it served per second (a
`TokenWindow`) from `record_autoscaling_stats()`; the controller averages each replica's reports
over `look_back_period_s` and hands them to the policy as `ctx.aggregated_metrics[metric][replica]`.

Wiring (Ray 2.60): `serve.deployment(autoscaling_config=autoscaling_config("tokens", ...))`, i.e.

    {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
     "policy": {"policy_function": "moray.deploy.serve.autoscaling:TokensPolicy",
                "policy_kwargs": {"target_tokens_per_s": 2000.0, "upscale_delay_s": 5.0, ...}}}

Serve passes `policy_kwargs` only to a policy *class* (instantiated once per deployment, then called
with the context each control-loop tick); a plain function gets no kwargs. Serve also wraps every
custom policy with its own delay logic (`upscale_delay_s` / `downscale_delay_s` of the config), so
the builder sets those to 0 and the delays and hysteresis live here, in `decide`.
"""

from __future__ import annotations

import inspect
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

TOKENS_METRIC = "tokens_per_s"  # expert-token pairs served per second by one replica
SEQUENCES_METRIC = "sequences"  # queued + running sequences of one dispatcher replica
_EXPERT_METRIC = re.compile(r"^tokens_per_s\.l(\d+)\.e(\d+)$")
_EPS_S = 1e-6


class ScalingContext(Protocol):
    """The attributes of Serve's `AutoscalingContext` the policies read."""

    target_num_replicas: int
    capacity_adjusted_min_replicas: int
    capacity_adjusted_max_replicas: int
    policy_state: dict[str, Any]
    current_time: float | None

    @property
    def aggregated_metrics(self) -> Mapping[str, Mapping[Any, float]] | None: ...

    @property
    def total_num_requests(self) -> float: ...


def expert_metric(layer: int, expert: int) -> str:
    """Name of the per-(layer, expert) rate a shard reports: `tokens_per_s.l{layer}.e{expert}`."""
    return f"{TOKENS_METRIC}.l{layer}.e{expert}"


def parse_expert_metric(name: str) -> tuple[int, int] | None:
    """(layer, expert) of an `expert_metric` name, None for any other metric."""
    m = _EXPERT_METRIC.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def metric_total(ctx: ScalingContext, metric: str) -> float | None:
    """Sum over running replicas of one custom metric (None when no replica has reported it yet)."""
    per_replica = (ctx.aggregated_metrics or {}).get(metric)
    if not per_replica:
        return None
    return float(sum(per_replica.values()))


# ---- the decision ----------------------------------------------------------------------------------
def decide(ctx: ScalingContext, load: float | None, per_replica: float, *, upscale_delay_s: float,
           downscale_delay_s: float, downscale_margin: float = 0.2,
           now: float | None = None) -> tuple[int, dict[str, Any]]:
    """Replica count for `load` at `per_replica` each, with delays and hysteresis; returns (n, state).

    Up: ceil(load / per_replica), once that desire has held `upscale_delay_s` (to the smallest count
    desired meanwhile). Down: only when the load fits fewer replicas each at most (1 - margin) busy,
    once that held `downscale_delay_s` (to the largest count desired meanwhile). In between: hold.
    Bounds are `ctx.capacity_adjusted_{min,max}_replicas`; no metric yet (`load` None): hold.
    """
    if per_replica <= 0 or not 0 <= downscale_margin < 1:
        raise ValueError(f"need per_replica > 0 and 0 <= margin < 1, got {per_replica}, {downscale_margin}")
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    current = ctx.target_num_replicas

    def clamp(n: int) -> int:
        return max(lo, min(hi, n))

    if load is None:
        return clamp(current), {}
    want_up = clamp(math.ceil(load / per_replica - 1e-9))
    want_down = clamp(math.ceil(load / (per_replica * (1 - downscale_margin)) - 1e-9))
    hold = clamp(current)  # bounds apply at once; only load-driven changes wait
    if want_up > hold:
        return _after_delay(ctx.policy_state, "up", want_up, hold, upscale_delay_s, _now(ctx, now), min)
    if want_down < hold:
        return _after_delay(ctx.policy_state, "down", want_down, hold, downscale_delay_s, _now(ctx, now), max)
    return hold, {}


def _now(ctx: ScalingContext, now: float | None) -> float:
    if now is not None:
        return now
    ctx_time = getattr(ctx, "current_time", None)
    return ctx_time if ctx_time is not None else time.time()


def _after_delay(state: Mapping[str, Any] | None, direction: str, desired: int, hold: int, delay_s: float,
                 now: float, keep: Callable[[int, int], int]) -> tuple[int, dict[str, Any]]:
    """Scale to `desired` once a wish in `direction` (made at target `hold`) has lasted `delay_s`;
    until then remember it and hold. A wish made at another target is stale: start over."""
    state = state or {}
    if state.get("moray.direction") == direction and state.get("moray.from") == hold:
        since, bound = float(state["moray.since"]), keep(int(state["moray.bound"]), desired)
    else:
        since, bound = now, desired
    state = {"moray.direction": direction, "moray.from": hold, "moray.since": since, "moray.bound": bound}
    # Once due, keep answering `bound` (state kept) until the target moves: a caller that adds its
    # own delay on top (Serve, if its delays are not 0) then sees a steady wish, not a blip.
    return (bound if now - since + _EPS_S >= delay_s else hold), state


# ---- the policies ----------------------------------------------------------------------------------
def tokens_policy(ctx: ScalingContext, target_tokens_per_s: float = 1000.0, upscale_delay_s: float = 5.0,
                  downscale_delay_s: float = 30.0, metric: str = TOKENS_METRIC, downscale_margin: float = 0.2,
                  now: float | None = None) -> tuple[int, dict[str, Any]]:
    """Expert shards: ceil(tokens/s summed over replicas / target_tokens_per_s), within bounds."""
    return decide(ctx, metric_total(ctx, metric), target_tokens_per_s, upscale_delay_s=upscale_delay_s,
                  downscale_delay_s=downscale_delay_s, downscale_margin=downscale_margin, now=now)


def sequences_policy(ctx: ScalingContext, target_seqs_per_replica: float = 16.0, upscale_delay_s: float = 5.0,
                     downscale_delay_s: float = 30.0, metric: str = SEQUENCES_METRIC,
                     downscale_margin: float = 0.2, now: float | None = None) -> tuple[int, dict[str, Any]]:
    """Dispatchers: on queued + running sequences (custom metric), else Serve's ongoing requests
    (one streaming `generate` call per sequence, so the two agree when the metric is missing)."""
    load = metric_total(ctx, metric)
    if load is None:
        load = float(ctx.total_num_requests)
    return decide(ctx, load, target_seqs_per_replica, upscale_delay_s=upscale_delay_s,
                  downscale_delay_s=downscale_delay_s, downscale_margin=downscale_margin, now=now)


class TokensPolicy:
    """`tokens_policy` with its kwargs bound: the class Serve instantiates with `policy_kwargs`."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def __call__(self, ctx: ScalingContext) -> tuple[int, dict[str, Any]]:
        return tokens_policy(ctx, **self.kwargs)


class SequencesPolicy:
    """`sequences_policy` with its kwargs bound: the class Serve instantiates with `policy_kwargs`."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def __call__(self, ctx: ScalingContext) -> tuple[int, dict[str, Any]]:
        return sequences_policy(ctx, **self.kwargs)


POLICIES = {"tokens": f"{__name__}:TokensPolicy", "sequences": f"{__name__}:SequencesPolicy"}
_POLICY_FUNCTIONS: dict[str, Callable[..., tuple[int, dict[str, Any]]]] = {
    "tokens": tokens_policy, "sequences": sequences_policy}


def autoscaling_config(policy: str, *, min_replicas: int, max_replicas: int,
                       initial_replicas: int | None = None, policy_kwargs: Mapping[str, Any] | None = None,
                       look_back_period_s: float = 15.0,
                       metrics_interval_s: float | None = None) -> dict[str, Any]:
    """What `serve.deployment(autoscaling_config=...)` takes, for policy "tokens", "sequences" or an
    import path `module:Class` (a class, so that Serve forwards `policy_kwargs` to it).

    Serve's own up/down delays are set to 0: the policy applies `upscale_delay_s` / `downscale_delay_s`
    from `policy_kwargs` itself (with hysteresis), and Serve's would add to them. `metrics_interval_s`
    is how often replicas push their stats to the controller (Serve's default 10 s; deprecated field,
    it warns when set).
    """
    if policy in _POLICY_FUNCTIONS:  # a typo would only surface in the Serve controller's log
        try:
            inspect.signature(_POLICY_FUNCTIONS[policy]).bind(None, **(policy_kwargs or {}))
        except TypeError as e:
            raise ValueError(f"bad policy_kwargs for the {policy!r} policy: {e}") from e
    config: dict[str, Any] = {
        "min_replicas": min_replicas, "max_replicas": max_replicas,
        "upscale_delay_s": 0.0, "downscale_delay_s": 0.0, "look_back_period_s": look_back_period_s,
        "policy": {"policy_function": POLICIES.get(policy, policy),
                   "policy_kwargs": dict(policy_kwargs or {})},
    }
    if initial_replicas is not None:
        config["initial_replicas"] = initial_replicas
    if metrics_interval_s is not None:
        config["metrics_interval_s"] = metrics_interval_s
    return config


# ---- the replica side: a sliding-window token counter ----------------------------------------------
class TokenWindow:
    """Expert-token pairs served over the last `window_s` seconds, in total and per (layer, expert).

    Counts go into `bucket_s` buckets in a ring; expired buckets are subtracted from running sums,
    so `record` and `rate` are O(keys touched) amortised. A lock guards the state (Serve may run a
    sync `serve` in a thread pool while `record_autoscaling_stats` runs on the event loop).
    """

    def __init__(self, window_s: float = 10.0, bucket_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0 or not 0 < bucket_s <= window_s:
            raise ValueError(f"need 0 < bucket_s <= window_s, got {bucket_s}, {window_s}")
        self.window_s, self.bucket_s, self.clock = window_s, bucket_s, clock
        self._n_buckets = max(1, round(window_s / bucket_s))
        self._buckets: deque[tuple[int, dict[tuple[int, int], int]]] = deque()
        self._sums: dict[tuple[int, int], int] = {}
        self._total = 0
        self._start = clock()
        self._lock = threading.Lock()

    def record(self, layer: int, counts: Mapping[int, int] | Sequence[int], now: float | None = None) -> None:
        """Add one call's tokens for `layer`: counts[expert] (a list over experts or a dict)."""
        items = counts.items() if isinstance(counts, Mapping) else enumerate(counts)
        with self._lock:
            bucket = self._bucket(self._advance(now))
            for expert, n in items:
                if n:
                    key = (layer, int(expert))
                    bucket[key] = bucket.get(key, 0) + int(n)
                    self._sums[key] = self._sums.get(key, 0) + int(n)
                    self._total += int(n)

    def rate(self, now: float | None = None) -> float:
        """Expert-token pairs per second over the window."""
        with self._lock:
            t = self._advance(now)
            return self._total / self._span(t)

    def rates(self, now: float | None = None) -> dict[tuple[int, int], float]:
        """(layer, expert) -> tokens per second over the window (experts with tokens only)."""
        with self._lock:
            span = self._span(self._advance(now))
            return {key: n / span for key, n in self._sums.items()}

    def stats(self, now: float | None = None, per_expert: bool = True) -> dict[str, float]:
        """The dict a shard returns from `record_autoscaling_stats()`."""
        out = {TOKENS_METRIC: self.rate(now)}
        if per_expert:
            out.update({expert_metric(*key): r for key, r in sorted(self.rates(now).items())})
        return out

    def _advance(self, now: float | None) -> float:
        """Drop buckets that left the window; returns the time used."""
        t = self.clock() if now is None else now
        oldest = int(t // self.bucket_s) - self._n_buckets + 1
        while self._buckets and self._buckets[0][0] < oldest:
            for key, n in self._buckets.popleft()[1].items():
                left = self._sums[key] - n
                self._total -= n
                if left:
                    self._sums[key] = left
                else:
                    del self._sums[key]
        return t

    def _bucket(self, t: float) -> dict[tuple[int, int], int]:
        idx = int(t // self.bucket_s)
        if not self._buckets or self._buckets[-1][0] != idx:
            self._buckets.append((idx, {}))
        return self._buckets[-1][1]

    def _span(self, t: float) -> float:
        """Seconds the kept buckets cover, up to now (shorter just after start), at least one bucket."""
        window_start = (int(t // self.bucket_s) - self._n_buckets + 1) * self.bucket_s
        return max(self.bucket_s, t - max(self._start, window_start))
