"""The load tables `moray status` and `/v1/moray/status` build from the expert-shard replicas' reports."""

from __future__ import annotations

from typing import Any

import numpy as np

from moray.deploy.serve.state import expert_tables, shard_name


def report(shard: int, replica: str, tokens: list[list[int]], rates: list[list[float]]) -> dict[str, Any]:
    """One replica's `load_report()`, 2 layers x 4 experts."""
    return {"shard": shard, "replica": replica, "num_layers": 2, "num_experts": 4, "tokens_per_s": 0.0,
            "tokens_total": sum(n for *_, n in tokens), "tokens": tokens, "rates": rates}


def test_expert_tables_sum_replicas_and_shards() -> None:
    reports = [report(0, "a", [[0, 0, 5], [1, 2, 7]], [[0, 0, 1.5]]),
               report(0, "b", [[0, 0, 3]], [[0, 0, 0.5], [1, 2, 2.0]]),
               report(1, "c", [[0, 1, 4], [1, 3, 9]], [[1, 3, 3.0]])]
    tables = expert_tables(reports)
    assert tables is not None
    want = np.zeros((2, 4), dtype=np.int64)
    for r in reports:
        for layer, expert, n in r["tokens"]:
            want[layer, expert] += n
    assert tables["tokens"] == want.tolist()
    assert tables["tokens_per_s"] == [[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 3.0]]
    assert expert_tables([]) is None


def test_shard_names() -> None:
    assert [shard_name(g) for g in range(2)] == ["expert-shard-0", "expert-shard-1"]
