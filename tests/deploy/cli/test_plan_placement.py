"""`moray plan-placement` (no Ray needed), fed by what `moray status --stats-out` writes.

The per-GPU loads are recomputed here from the placement file's JSON with plain numpy (an expert's
tokens split evenly over its copies), apart from moray's own `gpu_loads`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moray.actors.placement import save_stats
from moray.deploy.cli import main
from moray.deploy.cli.status import write_stats
from moray.deploy.serve.state import expert_tables


def per_gpu_ratio(shards: list[list[list[int]]], loads: np.ndarray) -> np.ndarray:
    """[L] max/mean tokens per GPU for `shards` [G][L] -> expert ids."""
    out = []
    for layer in range(loads.shape[0]):
        copies = np.zeros(loads.shape[1])
        for shard in shards:
            copies[shard[layer]] += 1
        per_gpu = np.array([sum(loads[layer, e] / copies[e] for e in shard[layer]) for shard in shards])
        out.append(per_gpu.max() / per_gpu.mean())
    return np.array(out)


def round_robin(num_layers: int, num_experts: int, gpus: int) -> list[list[list[int]]]:
    shard = [[e for e in range(num_experts) if e % gpus == g] for g in range(gpus)]
    return [[shard[g] for _ in range(num_layers)] for g in range(gpus)]


def skewed(num_layers: int = 3, num_experts: int = 8, seed: int = 0) -> np.ndarray:
    """[L, E] token counts: one hot expert per layer (a different one each layer), a Zipf-ish tail."""
    rng = np.random.default_rng(seed)
    loads = rng.integers(50, 150, size=(num_layers, num_experts)).astype(np.float64)
    for layer in range(num_layers):
        loads[layer, (3 * layer) % num_experts] = 2000 + 500 * layer
    return loads


Capture = pytest.CaptureFixture[str]


def run(capsys: Capture, argv: list[str]) -> tuple[int, str, str]:
    """`moray ARGV` in this process: (exit code, stdout, stderr)."""
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def plan(capsys: Capture, tmp_path: Path, loads: np.ndarray, *flags: str) -> tuple[int, str, str, Path]:
    stats, out = tmp_path / "loads.json", tmp_path / "placement.json"
    save_stats(stats, loads)
    return (*run(capsys, ["plan-placement", "--stats", str(stats), "--out", str(out), *flags]), out)


def test_plan_placement_balances_a_skewed_table(capsys: Capture, tmp_path: Path) -> None:
    loads = skewed()
    code, out, err, path = plan(capsys, tmp_path, loads, "--gpus", "4", "--redundant", "4")
    assert code == 0, err
    body = json.loads(path.read_text())
    shards = body["shards"]
    assert len(shards) == 4 and all(len(s) == 3 for s in shards)
    for layer in range(3):
        placed = [e for s in shards for e in s[layer]]
        assert set(placed) == set(range(8)) and len(placed) == 12  # every expert, plus 4 copies
        assert all(len(s[layer]) == 3 for s in shards)  # equal slots per GPU
        assert all(len(set(s[layer])) == len(s[layer]) for s in shards)  # no expert twice on a GPU
    before = per_gpu_ratio(round_robin(3, 8, 4), loads)
    after = per_gpu_ratio(shards, loads)
    assert before.mean() >= 2.0
    assert after.mean() <= 1.15 and after.max() <= 1.15
    summary = re.search(r"before ([\d.]+), after ([\d.]+)", out)
    assert summary, out
    assert float(summary.group(1)) == pytest.approx(before.mean(), abs=1e-3)
    assert float(summary.group(2)) == pytest.approx(after.mean(), abs=1e-3)
    assert f"moray serve --placement {path}" in out


def test_plan_placement_json_report(capsys: Capture, tmp_path: Path) -> None:
    loads = skewed(num_layers=2)
    code, out, err, path = plan(capsys, tmp_path, loads, "--gpus", "4", "--redundant", "4", "--json")
    assert code == 0, err
    report = json.loads(out)
    shards = json.loads(path.read_text())["shards"]
    assert report["placement"] == str(path)
    before = per_gpu_ratio(round_robin(2, 8, 4), loads)
    assert report["before"]["imbalance_mean"] == pytest.approx(before.mean())
    assert report["after"]["imbalance_mean"] == pytest.approx(per_gpu_ratio(shards, loads).mean())
    for side in ("before", "after"):
        assert len(report[side]["max_gpu_load"]) == len(report[side]["mean_gpu_load"]) == 2
        assert report[side]["mean_gpu_load"] == pytest.approx((loads.sum(axis=1) / 4).tolist())


def test_uniform_load_stays_balanced(capsys: Capture, tmp_path: Path) -> None:
    loads = np.full((2, 8), 100.0)
    code, _, err, path = plan(capsys, tmp_path, loads, "--gpus", "4")
    assert code == 0, err
    assert per_gpu_ratio(json.loads(path.read_text())["shards"], loads).max() == pytest.approx(1.0)


def test_more_gpus_than_experts(capsys: Capture, tmp_path: Path) -> None:
    """6 GPUs, 4 experts: no round-robin to compare with; 2 redundant copies fill every GPU."""
    loads = np.array([[900.0, 100.0, 100.0, 100.0]])
    code, out, err, path = plan(capsys, tmp_path, loads, "--gpus", "6", "--redundant", "2")
    assert code == 0, err
    shards = json.loads(path.read_text())["shards"]
    assert len(shards) == 6 and all(len(s[0]) == 1 for s in shards)
    assert sorted(e for s in shards for e in s[0]) == [0, 0, 0, 1, 2, 3]
    assert "before -" in out


@pytest.mark.parametrize("case", ["missing", "negative", "shape", "too_few_copies"])
def test_errors_are_one_line_exit_2(capsys: Capture, tmp_path: Path, case: str) -> None:
    stats = tmp_path / "loads.json"
    gpus = "2"
    if case == "negative":
        stats.write_text(json.dumps({"num_layers": 1, "num_experts": 2, "tokens": [[1, -1]]}))
    elif case == "shape":
        stats.write_text(json.dumps({"num_layers": 2, "num_experts": 2, "tokens": [[1, 1]]}))
    elif case == "too_few_copies":
        save_stats(stats, np.ones((1, 4)))
        gpus = "5"
    code, out, err = run(capsys, ["plan-placement", "--stats", str(stats), "--gpus", gpus,
                           "--out", str(tmp_path / "p.json")])
    assert code == 2 and out == ""
    assert err.startswith("moray: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "p.json").exists()


def report(shard: int, tokens: list[list[int]]) -> dict[str, Any]:
    """One replica's `load_report()`, 2 layers x 4 experts."""
    return {"shard": shard, "replica": str(shard), "num_layers": 2, "num_experts": 4, "tokens_per_s": 0.0,
            "tokens_total": sum(n for *_, n in tokens), "tokens": tokens, "rates": []}


def test_status_stats_feed_plan_placement(capsys: Capture, tmp_path: Path) -> None:
    """What `status --stats-out` writes is what `plan-placement --stats` reads."""
    tables = expert_tables([report(0, [[0, 0, 800], [1, 0, 900]]),
                            report(1, [[0, 1, 50], [0, 2, 60], [0, 3, 70], [1, 1, 40], [1, 2, 30],
                                       [1, 3, 20]])])
    stats = tmp_path / "loads.json"
    write_stats(stats, {"experts": tables})
    code, _, err = run(capsys, ["plan-placement", "--stats", str(stats), "--gpus", "2", "--redundant", "2",
                         "--out", str(tmp_path / "p.json")])
    assert code == 0, err
    shards = json.loads((tmp_path / "p.json").read_text())["shards"]
    assert all(0 in s[layer] for s in shards for layer in range(2))  # the hot expert on both GPUs
