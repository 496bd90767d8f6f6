"""moray's metric names as Prometheus sees them: recorded in a Ray actor, scraped from Ray's metrics agent.

The scrape (parsed with prometheus_client's own parser) is the oracle for `exported_names()`, which the
Grafana dashboard test relies on.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from moray.deploy.serve import metrics
from moray.deploy.serve.metrics import METRICS, exported_names

# Tag values no other test uses, so values read back are ours alone.
SHARD, LAYER, EXPERT = 97, 98, 5
ENDPOINT = "/test/metrics-export"


@ray.remote(num_cpus=0)
class Emitter:
    """Records every declared metric once through the public API, then stays alive to be scraped."""

    def emit(self) -> str:
        """Records, and returns the id of the node whose metrics agent exports it."""
        metrics.record_request(200, ENDPOINT)
        metrics.record_request(429, ENDPOINT)
        metrics.record_tokens(prompt_tokens=7, generation_tokens=3)
        metrics.record_latencies(ttft_s=0.2, itl_s=0.02, e2e_s=1.5)
        metrics.set_engine_gauges(waiting=2, running=4, kv_used=10, kv_free=54)
        metrics.record_expert_tokens(SHARD, {(LAYER, EXPERT): 5, (LAYER, EXPERT + 1): 0})
        metrics.set_shard_replicas(SHARD, 3)
        metrics.observe_transport(SHARD, 0.003)
        for phase in metrics.STEP_PHASES:
            metrics.observe_step(phase, 0.001)
        metrics.set_balancedness([0.5, 0.75], overall=0.6)
        metrics.record_rebalance("applied", "test", version=2)
        metrics.set_placement_version(2)
        metrics.record_shard_faults(SHARD, "hung", 2)
        return ray.get_runtime_context().get_node_id()


def ours(samples: list[tuple[dict[str, str], float]], **labels: object) -> list[float]:
    return [v for lab, v in samples if all(lab.get(k) == str(x) for k, x in labels.items())]


def exported(samples: dict[str, list[tuple[dict[str, str], float]]]) -> bool:
    """Every name is exported and this module's tagged samples are among them (other tests record the
    same names, so the names alone can be there before the emitter's values are)."""
    tagged = [("ray_moray_requests_total", {"endpoint": ENDPOINT, "status": 200}),
              ("ray_moray_requests_total", {"endpoint": ENDPOINT, "status": 429}),
              ("ray_moray_expert_tokens_total", {"shard": SHARD, "layer": LAYER, "expert": EXPERT}),
              ("ray_moray_shard_replicas", {"shard": SHARD}),
              ("ray_moray_transport_seconds_count", {"shard": SHARD}),
              ("ray_moray_shard_faults_total", {"shard": SHARD, "kind": "hung"})]
    return exported_names() <= set(samples) and all(ours(samples.get(name, []), **labels)
                                                    for name, labels in tagged)


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] for moray's samples."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_moray_"):
                samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


@pytest.fixture(scope="module")
def scraped(ray_session: object) -> dict[str, list[tuple[dict[str, str], float]]]:
    emitter = Emitter.remote()  # type: ignore[attr-defined]
    node_id = ray.get(emitter.emit.remote())
    (port,) = [n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == node_id]
    deadline = time.monotonic() + 90
    samples = scrape(port)
    while not exported(samples) and time.monotonic() < deadline:
        time.sleep(2)
        samples = scrape(port)
    ray.kill(emitter)
    return samples


def test_exported_names_are_what_ray_exports(scraped: dict[str, list[tuple[dict[str, str], float]]]) -> None:
    assert set(scraped) == exported_names()


def test_ray_naming_rules_seen_in_scrape(scraped: dict[str, list[tuple[dict[str, str], float]]]) -> None:
    assert "ray_moray_requests_total" in scraped  # prefix added, `_total` not doubled
    assert "ray_moray_waiting_requests" in scraped  # gauge: prefix only
    assert {"ray_moray_step_seconds_bucket", "ray_moray_step_seconds_count"} <= set(scraped)
    assert "ray_moray_step_seconds" not in scraped  # a histogram has no bare sample


def test_values_and_labels_survive_export(scraped: dict[str, list[tuple[dict[str, str], float]]]) -> None:
    requests = scraped["ray_moray_requests_total"]
    assert ours(requests, endpoint=ENDPOINT, status=200) == [1.0]
    assert ours(requests, endpoint=ENDPOINT, status=429) == [1.0]
    tokens = scraped["ray_moray_expert_tokens_total"]
    assert ours(tokens, shard=SHARD, layer=LAYER, expert=EXPERT) == [5.0]
    assert ours(tokens, shard=SHARD, layer=LAYER, expert=EXPERT + 1) == []  # zero counts are not sent
    assert ours(scraped["ray_moray_shard_replicas"], shard=SHARD) == [3.0]
    assert ours(scraped["ray_moray_transport_seconds_count"], shard=SHARD) == [1.0]
    buckets = {lab["le"]: v for lab, v in scraped["ray_moray_transport_seconds_bucket"]
               if lab.get("shard") == str(SHARD)}
    assert buckets["0.0025"] == 0.0 and buckets["0.005"] == 1.0 and buckets["+Inf"] == 1.0
    assert ours(scraped["ray_moray_shard_faults_total"], shard=SHARD, kind="hung") == [2.0]
    phases = {lab["phase"] for lab, _ in scraped["ray_moray_step_seconds_count"]}
    assert set(metrics.STEP_PHASES) <= phases


def test_spec_table_is_consistent() -> None:
    names = [spec.name for spec in METRICS]
    assert len(names) == len(set(names))
    with pytest.raises(ValueError):
        metrics.MetricSpec("moray_x", "counter", "a counter without _total")
    with pytest.raises(ValueError):
        metrics.MetricSpec("moray_y_seconds", "histogram", "no buckets")


def test_wrong_use_is_an_error() -> None:
    with pytest.raises(KeyError):
        metrics.get_metric("moray_nope")
    with pytest.raises(ValueError, match="takes tags"):
        metrics.inc("moray_requests_total", 1, {"status": "200"})  # endpoint missing
    with pytest.raises(ValueError, match="takes tags"):
        metrics.set_gauge("moray_waiting_requests", 1, {"shard": 0})  # a label it does not have
    with pytest.raises(TypeError):
        metrics.observe("moray_requests_total", 1.0, {"status": "200", "endpoint": "/"})
    with pytest.raises(ValueError):
        metrics.inc("moray_prompt_tokens_total", -1)
    with pytest.raises(ValueError):
        metrics.observe_step("decode", 0.1)


def test_endpoint_label_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_endpoints", set())
    seen = [metrics._bounded_endpoint(f"/scan/{i}") for i in range(metrics.MAX_ENDPOINTS + 5)]
    assert seen[: metrics.MAX_ENDPOINTS] == [f"/scan/{i}" for i in range(metrics.MAX_ENDPOINTS)]
    assert set(seen[metrics.MAX_ENDPOINTS:]) == {"other"}
    assert metrics._bounded_endpoint("/scan/0") == "/scan/0"  # known values stay themselves


def test_nothing_created_at_import() -> None:
    code = ("import moray.deploy.serve.metrics as m; "
            "assert not m._instances; "
            "m.get_metric('moray_waiting_requests'); assert list(m._instances) == ['moray_waiting_requests']")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
