"""Request ids reach the dispatcher's and the shards' log lines (issue 10)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx


def log_lines_with(session_dirs: list[Path], needle: str) -> list[str]:
    lines = []
    for d in session_dirs:
        for f in (d / "logs").glob("worker-*.err"):
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            lines += [line for line in text.splitlines() if needle in line]
    return lines


def test_request_id_in_dispatcher_and_shard_logs(served_app: Any, ray_session: Any) -> None:
    rid = f"obs-{uuid.uuid4().hex[:12]}"
    r = httpx.post(f"{served_app.base_url}/completions", headers={"X-Request-Id": rid}, timeout=60,
                   json={"model": served_app.model_name, "prompt": "Hello there", "max_tokens": 3})
    assert r.status_code == 200
    sessions = sorted({Path(n.get_session_dir_path()) for n in ray_session.list_all_nodes()})
    deadline, lines = time.monotonic() + 30, []
    while time.monotonic() < deadline:
        lines = log_lines_with(sessions, rid)
        if any("admitted" in line for line in lines) and any("expert shard" in line for line in lines):
            break
        time.sleep(0.5)
    assert any("moray.model.engine" in line and "admitted" in line for line in lines), lines
    assert any("moray.actors.experts" in line and "requests joined" in line for line in lines), lines


# ---- every declared metric is recorded by the product's own path --------------------------------------
def scrape_all() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, labels) -> value of every `ray_moray_*` sample on every node's metrics agent."""
    import urllib.request

    import ray
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("ray_moray_"):
                    key = (s.name, tuple(sorted(s.labels.items())))
                    samples[key] = samples.get(key, 0.0) + s.value
    return samples


def grown(before: dict, after: dict, name: str, **labels: str) -> bool:
    """Some `name` series with `labels` is new or larger than before."""
    return any(n == name and all(dict(lab).get(k) == v for k, v in labels.items())
               and value > before.get((n, lab), 0.0) for (n, lab), value in after.items())


def missing_after_one_request(before: dict, after: dict) -> list[str]:
    """The declared metrics this request's path did not record (gauges: a series for the served app)."""
    from moray.deploy.serve.metrics import EVENT_METRICS, METRICS, STEP_PHASES

    checks: dict[str, bool] = {}
    for spec in METRICS:
        if spec.name in EVENT_METRICS:  # e.g. rebalances: tests/e2e/test_replacement.py checks them
            continue
        name = "ray_" + spec.name + ("_count" if spec.kind == "histogram" else "")
        if spec.kind == "gauge":
            checks[spec.name] = any(n == name for n, _ in after)
        elif "shard" in spec.tag_keys:
            checks[spec.name] = all(grown(before, after, name, shard=str(g)) for g in range(2))
        elif "phase" in spec.tag_keys:
            checks[spec.name] = all(grown(before, after, name, phase=p) for p in STEP_PHASES)
        elif "endpoint" in spec.tag_keys:
            checks[spec.name] = grown(before, after, name, endpoint="/v1/completions", status="200")
        else:
            checks[spec.name] = grown(before, after, name)
    checks["moray_shard_replicas"] = all(
        any(n == "ray_moray_shard_replicas" and dict(lab).get("shard") == str(g) for n, lab in after)
        for g in range(2))
    return sorted(name for name, ok in checks.items() if not ok)


def test_one_request_records_every_declared_metric(served_app: Any, ray_session: Any) -> None:
    before = scrape_all()
    r = httpx.post(f"{served_app.base_url}/completions", timeout=60,
                   json={"model": served_app.model_name, "prompt": "Hello there, how", "max_tokens": 8,
                         "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200
    deadline, missing = time.monotonic() + 90, ["?"]
    while missing and time.monotonic() < deadline:
        time.sleep(3)
        missing = missing_after_one_request(before, scrape_all())
    assert missing == []
