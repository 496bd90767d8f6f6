"""`moray status` without a cluster: the tables it prints from an `app_status` result, and `--json`."""

from __future__ import annotations

from typing import Any

from moray.deploy.cli.status import format_status, hottest, table


def replica(shard: int, name: str, tokens: list[list[int]], rate: float) -> dict[str, Any]:
    return {"shard": shard, "replica": name, "num_layers": 2, "num_experts": 4, "tokens_per_s": rate,
            "tokens_total": sum(n for *_, n in tokens), "tokens": tokens, "rates": []}


STATUS: dict[str, Any] = {
    "app": "moray", "status": "RUNNING",
    "deployments": {
        "dispatcher": {"status": "HEALTHY", "replicas": {"RUNNING": 1}, "num_replicas": 1},
        "expert-shard-0": {"status": "UPSCALING", "replicas": {"RUNNING": 2, "STARTING": 1},
                           "num_replicas": 2},
        "openai-ingress": {"status": "HEALTHY", "replicas": {"RUNNING": 1}, "num_replicas": 1},
    },
    "shards": {"expert-shard-0": {"tokens_per_s": 30.5, "replicas": [replica(0, "a", [[0, 0, 70]], 20.0),
                                                                      replica(0, "b", [[1, 2, 5]], 10.5)]}},
    "experts": {"num_layers": 2, "num_experts": 4, "tokens": [[70, 10, 0, 20], [0, 0, 5, 0]],
                "tokens_per_s": [[20.0, 1.0, 0.0, 0.0], [0.0, 0.0, 10.5, 0.0]]},
}


def test_table_aligns_columns() -> None:
    lines = table(["A", "LONG HEADER"], [["xyz", 1], ["w", 12345]])
    assert lines == ["A    LONG HEADER", "xyz  1", "w    12345"]


def test_hottest_experts_by_rate_with_their_share_of_the_layer() -> None:
    rows = hottest(STATUS["experts"], 2)
    assert rows == [[0, 0, "20.0", 70, "70.0%"], [1, 2, "10.5", 5, "100.0%"]]


def test_hottest_falls_back_to_counts_when_idle() -> None:
    idle = {**STATUS["experts"], "tokens_per_s": [[0.0] * 4, [0.0] * 4]}
    assert [r[:2] for r in hottest(idle, 3)] == [[0, 0], [0, 3], [0, 1]]


def test_status_prints_deployments_shards_and_hot_experts() -> None:
    text = format_status(STATUS, top=1)
    assert text.startswith("app moray: RUNNING\n")
    lines = text.splitlines()
    assert lines[2].split() == ["DEPLOYMENT", "STATUS", "RUNNING", "REPLICAS", "BY", "STATE"]
    assert lines[4].split() == ["expert-shard-0", "UPSCALING", "2", "RUNNING=2", "STARTING=1"]
    assert "expert-shard-0  2         30.5      75" in text
    assert lines[-1].split() == ["0", "0", "20.0", "70", "70.0%"]


def test_status_before_any_load() -> None:
    quiet = {**STATUS, "shards": {}, "experts": None}
    assert format_status(quiet).rstrip().endswith("no expert has served a token yet")
    idle = {**STATUS, "experts": {**STATUS["experts"], "tokens": [[0] * 4] * 2}}
    assert format_status(idle).rstrip().endswith("no expert has served a token yet")
