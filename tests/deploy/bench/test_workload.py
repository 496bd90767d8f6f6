"""The benchmark's statistics against numpy, and its length distributions."""

from __future__ import annotations

import argparse
import random

import numpy as np
import pytest

from moray.deploy.bench import workload


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    values = rng.exponential(size=n).tolist()
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert workload.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    d = workload.describe(values)
    assert d["mean"] == pytest.approx(float(np.mean(values)))
    assert d["p50"] <= d["p90"] <= d["p99"]


def test_empty_statistics_are_none() -> None:
    assert workload.percentile([], 50) is None
    assert workload.describe([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_union_length_matches_a_grid() -> None:
    rng = random.Random(0)
    for _ in range(50):
        starts = [rng.randint(0, 40) for _ in range(rng.randint(0, 6))]
        intervals = [(a, a + rng.randint(0, 9)) for a in starts]
        covered = np.zeros(60, dtype=bool)
        for a, b in intervals:
            covered[a:b] = True  # unit cells [i, i+1) inside [a, b)
        assert workload.union_length([(float(a), float(b)) for a, b in intervals]) == covered.sum()


def test_summary_of_known_records() -> None:
    records = [workload.RequestRecord(4, 0.0, [1.0, 1.5, 2.5], 3, 2.5),
               workload.RequestRecord(6, 0.5, [2.0, 2.2], 2, 2.2),
               workload.RequestRecord(5, 0.0, [], 0, 0.1, error="RuntimeError: boom")]
    s = workload.summarize(records, 0.0, 2.5)
    assert (s["requests"], s["errors"], s["prompt_tokens"], s["output_tokens"]) == (2, 1, 10, 5)
    assert s["output_tokens_per_s"] == pytest.approx(5 / 2.5)
    assert s["prefill_tokens_per_s"] == pytest.approx(10 / 2.0)  # someone awaits a first token in [0, 2]
    assert s["decode_tokens_per_s"] == pytest.approx(3 / 1.5)  # someone decodes in [1, 2.5]
    assert s["itl_s"]["p50"] == pytest.approx(float(np.percentile([0.5, 1.0, 0.2], 50)))
    assert s["ttft_s"]["mean"] == pytest.approx(np.mean([1.0, 1.5]))


def test_length_distributions() -> None:
    assert workload.LengthDist.parse("64") == workload.LengthDist(64, 64)
    dist = workload.LengthDist.parse("3:9")
    rng = random.Random(1)
    draws = {dist.sample(rng) for _ in range(500)}
    assert draws == set(range(3, 10))
    for bad in ("0", "9:3", "1:2:3", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            workload.LengthDist.parse(bad)


# ---- runs ------------------------------------------------------------------------------------------------
