"""moray's Prometheus metrics, declared once in `METRICS` and recorded through `ray.util.metrics`.

Ray exports each process's metrics from the node's metrics agent (port 8080 under KubeRay), and
renames them on the way (checked against a live scrape in tests/k8s/test_metrics.py):
- every name gets the prefix `ray_` (`moray_waiting_requests` -> `ray_moray_waiting_requests`);
- a counter is exported as `<name>_total` (`_total` is not doubled: our counters already end in it);
- a histogram is exported as `<name>_bucket`, `<name>_sum` and `<name>_count`. Ray's agent rebuilds
  histograms from bucket counts, so `_sum` is approximate (bucket midpoints); quantiles from
  `_bucket` are the numbers to read.
`exported_names()` lists exactly those names; the Grafana dashboard queries them.

Metric objects are created on first use in each process (nothing happens at import time). Gauges
carry Ray's `WorkerId` label per process: sum them across replicas in PromQL.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ray.util.metrics import Counter, Gauge, Histogram

MetricKind = Literal["counter", "gauge", "histogram"]
Metric = Counter | Gauge | Histogram

EXPORT_PREFIX = "ray_"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
STEP_PHASES = ("attention", "transport", "sampling")  # "transport": the expert calls, compute included

_LATENCY_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_GAP_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
_E2E_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_ROUND_TRIP_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name as recorded (before Ray's renaming), kind, help text, labels, buckets."""

    name: str
    kind: MetricKind
    description: str
    tag_keys: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.startswith("moray_"):
            raise ValueError(f"{self.name}: moray metric names start with 'moray_'")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"{self.name}: counter names end in '_total' (Prometheus convention)")
        if (self.kind == "histogram") != bool(self.buckets):
            raise ValueError(f"{self.name}: histograms, and only histograms, have buckets")

    def exported_names(self) -> set[str]:
        """The sample names Prometheus stores for this metric when Ray exports it."""
        base = EXPORT_PREFIX + self.name
        if self.kind == "histogram":
            return {base + suffix for suffix in HISTOGRAM_SUFFIXES}
        if self.kind == "counter" and not base.endswith("_total"):
            return {base + "_total"}
        return {base}


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("moray_requests_total", "counter", "Finished requests by HTTP/gRPC status and endpoint.",
               ("status", "endpoint")),
    MetricSpec("moray_prompt_tokens_total", "counter", "Prompt tokens admitted."),
    MetricSpec("moray_generation_tokens_total", "counter", "Tokens generated."),
    MetricSpec("moray_time_to_first_token_seconds", "histogram", "Arrival to first generated token.",
               buckets=_LATENCY_S),
    MetricSpec("moray_inter_token_latency_seconds", "histogram", "Gap between consecutive tokens.",
               buckets=_TOKEN_GAP_S),
    MetricSpec("moray_e2e_request_latency_seconds", "histogram", "Arrival to last token.", buckets=_E2E_S),
    MetricSpec("moray_waiting_requests", "gauge", "Requests waiting for a slot (per dispatcher)."),
    MetricSpec("moray_running_sequences", "gauge", "Sequences in the running batch (per dispatcher)."),
    MetricSpec("moray_kv_blocks_used", "gauge", "KV-cache blocks in use (per dispatcher)."),
    MetricSpec("moray_kv_blocks_free", "gauge", "KV-cache blocks free (per dispatcher)."),
    MetricSpec("moray_expert_tokens_total", "counter", "Tokens an expert computed, by layer, expert, shard.",
               ("layer", "expert", "shard")),
    MetricSpec("moray_shard_replicas", "gauge", "Running replicas of an expert shard (over the data plane: "
               "those the dispatcher has a channel to).", ("shard",)),
    MetricSpec("moray_transport_seconds", "histogram",
               "Mean round trip of one layer's expert call to a shard, per export interval.",
               ("shard",), _ROUND_TRIP_S),
    MetricSpec("moray_step_seconds", "histogram",
               "Mean time per engine step phase (attention/transport/sampling), per export interval.",
               ("phase",), _ROUND_TRIP_S),
    MetricSpec("moray_expert_balancedness", "gauge",
               "Mean / max tokens per expert shard over the shards' window, per layer and overall "
               "(layer=\"all\": sum of means / sum of maxes); 1 is perfect balance.", ("layer",)),
    MetricSpec("moray_rebalances_total", "counter",
               "Online expert re-placements by outcome (applied, skipped, aborted, ...) and cause.",
               ("outcome", "cause")),
    MetricSpec("moray_placement_version", "gauge", "Version of the expert placement in force."),
    MetricSpec("moray_shard_faults_total", "counter",
               "Expert calls whose shard replica died, hung or refused the frame (each retried on another "
               "replica), by shard and kind.", ("shard", "kind")),
)
SPECS: dict[str, MetricSpec] = {spec.name: spec for spec in METRICS}
# recorded when a rebalance runs or a replica fails, not on every request's path
EVENT_METRICS = frozenset({"moray_rebalances_total", "moray_shard_faults_total"})

MAX_ENDPOINTS = 32  # distinct `endpoint` label values per process; later ones are recorded as "other"

_instances: dict[str, Metric] = {}
_endpoints: set[str] = set()
_lock = threading.Lock()


def exported_names() -> set[str]:
    """Every sample name moray's metrics have in Prometheus (after Ray's `ray_` prefix and suffixes)."""
    return set().union(*(spec.exported_names() for spec in METRICS))


def get_metric(name: str) -> Metric:
    """This process's metric object for `name` (one of `METRICS`), created on first use."""
    spec = SPECS.get(name)
    if spec is None:
        raise KeyError(f"unknown metric {name!r}; declared: {sorted(SPECS)}")
    with _lock:
        if name not in _instances:
            _instances[name] = _create(spec)
        return _instances[name]


def _create(spec: MetricSpec) -> Metric:
    if spec.kind == "counter":
        return Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
    return Histogram(spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.tag_keys)


def _tags(spec: MetricSpec, tags: Mapping[str, object] | None) -> dict[str, str]:
    given = dict(tags or {})
    if set(given) != set(spec.tag_keys):
        raise ValueError(f"{spec.name} takes tags {spec.tag_keys}, got {tuple(given)}")
    return {k: str(v) for k, v in given.items()}


def _typed(name: str, kind: MetricKind) -> tuple[MetricSpec, Metric]:
    metric = get_metric(name)
    spec = SPECS[name]
    if spec.kind != kind:
        raise TypeError(f"{name} is a {spec.kind}, not a {kind}")
    return spec, metric


def inc(name: str, value: float = 1.0, tags: Mapping[str, object] | None = None) -> None:
    """Add `value` to a counter; zero is a no-op (Ray rejects it), negative an error."""
    spec, metric = _typed(name, "counter")
    if value < 0:
        raise ValueError(f"{name}: counters only go up, got {value}")
    if value > 0:
        assert isinstance(metric, Counter)
        metric.inc(float(value), tags=_tags(spec, tags))


def set_gauge(name: str, value: float, tags: Mapping[str, object] | None = None) -> None:
    spec, metric = _typed(name, "gauge")
    assert isinstance(metric, Gauge)
    metric.set(float(value), tags=_tags(spec, tags))


def observe(name: str, value: float, tags: Mapping[str, object] | None = None) -> None:
    """Record one observation in a histogram."""
    spec, metric = _typed(name, "histogram")
    assert isinstance(metric, Histogram)
    metric.observe(float(value), tags=_tags(spec, tags))


def record_request(status: int | str, endpoint: str) -> None:
    """One finished request: `status` the HTTP code (or gRPC code name), `endpoint` e.g. '/v1/completions'.

    Endpoints may come from client-chosen paths: past `MAX_ENDPOINTS` distinct values they are
    recorded as "other", so that a scan of random URLs cannot grow the series without bound.
    """
    inc("moray_requests_total", 1, {"status": status, "endpoint": _bounded_endpoint(endpoint)})


def _bounded_endpoint(endpoint: str) -> str:
    with _lock:
        if endpoint in _endpoints:
            return endpoint
        if len(_endpoints) < MAX_ENDPOINTS:
            _endpoints.add(endpoint)
            return endpoint
    return "other"


def record_tokens(prompt_tokens: int, generation_tokens: int) -> None:
    inc("moray_prompt_tokens_total", prompt_tokens)
    inc("moray_generation_tokens_total", generation_tokens)


def record_latencies(
    ttft_s: float | None = None, itl_s: float | None = None, e2e_s: float | None = None
) -> None:
    """Any of: time to first token, one inter-token gap, end-to-end latency (seconds)."""
    for name, value in (("moray_time_to_first_token_seconds", ttft_s),
                        ("moray_inter_token_latency_seconds", itl_s),
                        ("moray_e2e_request_latency_seconds", e2e_s)):
        if value is not None:
            observe(name, value)


def record_expert_tokens(shard: int, counts: Mapping[tuple[int, int], int]) -> None:
    """Tokens shard `shard` computed, keyed by (layer, expert); zero counts are skipped."""
    for (layer, expert), n in counts.items():
        inc("moray_expert_tokens_total", n, {"layer": layer, "expert": expert, "shard": shard})


def set_engine_gauges(waiting: int, running: int, kv_used: int, kv_free: int) -> None:
    """The dispatcher's queue, batch and KV-cache occupancy, once per engine step (or less often)."""
    set_gauge("moray_waiting_requests", waiting)
    set_gauge("moray_running_sequences", running)
    set_gauge("moray_kv_blocks_used", kv_used)
    set_gauge("moray_kv_blocks_free", kv_free)


def set_shard_replicas(shard: int, replicas: int) -> None:
    set_gauge("moray_shard_replicas", replicas, {"shard": shard})


def record_shard_faults(shard: int, kind: str, n: int) -> None:
    """`n` more expert calls to `shard` met a fault of `kind` (died, hung, refused: `actors/faults.py`)."""
    inc("moray_shard_faults_total", n, {"shard": shard, "kind": kind})


def observe_transport(shard: int, seconds: float) -> None:
    """The mean round trip (send to receive, compute included) of the expert calls to `shard` since the
    last export (the served dispatcher exports every few seconds from `ShardedExperts.stats()`)."""
    observe("moray_transport_seconds", seconds, {"shard": shard})


def observe_step(phase: str, seconds: float) -> None:
    """Time spent in one phase of an engine step; `phase` is one of `STEP_PHASES`."""
    if phase not in STEP_PHASES:
        raise ValueError(f"phase must be one of {STEP_PHASES}, got {phase!r}")
    observe("moray_step_seconds", seconds, {"phase": phase})


def set_balancedness(layers: list[float], overall: float) -> None:
    for layer, value in enumerate(layers):
        set_gauge("moray_expert_balancedness", value, {"layer": layer})
    set_gauge("moray_expert_balancedness", overall, {"layer": "all"})


def record_rebalance(outcome: str, cause: str, version: int) -> None:
    inc("moray_rebalances_total", tags={"outcome": outcome, "cause": cause or "-"})
    if version > 0:
        set_placement_version(version)


def set_placement_version(version: int) -> None:
    set_gauge("moray_placement_version", version)
