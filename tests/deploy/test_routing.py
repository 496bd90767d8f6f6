"""Routing analysis (Mixtral §5): recorded router choices, proportions, repetition rates, live JSON.

Oracles: transformers' router logits for what the router chose; hand-counted ids arrays; a Monte Carlo
estimate of the chance levels (and the paper's published 12.5% / 46%).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from moray.deploy.routing import (
    chance_levels,
    expert_proportions,
    live_routing,
    record_routing,
    repetition_rates,
)
from moray.model.mixtral import load_local
from moray.model.tiny import TinySpec, make_tiny

SPEC = TinySpec(layers=3, dim=64, heads=4, kv_heads=2, experts=8, hidden=64, seed=21)
TOP_K = 2  # Mixtral's, which the tiny checkpoints keep

# ---------------------------------------------------------------- pure functions, hand-built ids


def test_proportions_on_hand_built_ids() -> None:
    # 4 tokens, 2 layers, top-2 over 4 experts.
    ids = np.array([
        [[0, 1], [3, 2]],
        [[0, 1], [1, 0]],
        [[2, 0], [3, 2]],
        [[3, 0], [2, 3]],
    ])
    props = expert_proportions(ids, num_experts=4)
    # layer 0: expert 0 chosen 4 times, 1 twice, 2 once, 3 once, out of 8 assignments.
    np.testing.assert_array_equal(props[0], [4 / 8, 2 / 8, 1 / 8, 1 / 8])
    np.testing.assert_array_equal(props[1], [1 / 8, 1 / 8, 3 / 8, 3 / 8])
    np.testing.assert_array_equal(expert_proportions(torch.tensor(ids), 6).sum(axis=1), [1.0, 1.0])


def test_repetition_on_hand_built_ids() -> None:
    ids = np.array([
        [[0, 1], [3, 2]],
        [[0, 1], [1, 0]],
        [[2, 0], [3, 2]],
        [[3, 0], [2, 3]],
    ])
    rates = repetition_rates(ids)
    # layer 0 pairs: (0,1)->(0,1) same first, overlap; (0,1)->(2,0) overlap on 0; (2,0)->(3,0) overlap on 0.
    # layer 1 pairs: (3,2)->(1,0) nothing; (1,0)->(3,2) nothing; (3,2)->(2,3) same set, different first.
    np.testing.assert_array_equal(rates["first_choice"], [1 / 3, 0.0])
    np.testing.assert_array_equal(rates["first_or_second"], [1.0, 1 / 3])
    with pytest.raises(ValueError):
        repetition_rates(ids[:1])


@pytest.mark.parametrize(("experts", "top_k"), [(8, 2), (4, 2), (16, 3), (3, 2), (8, 1), (6, 4)])
def test_chance_levels_match_monte_carlo(experts: int, top_k: int) -> None:
    rng = np.random.default_rng(experts * 10 + top_k)
    n = 100_000
    a = np.argsort(rng.random((n, experts)), axis=1)[:, :top_k]  # [n, k] uniform ordered choices
    b = np.argsort(rng.random((n, experts)), axis=1)[:, :top_k]
    pairs = zip(a.tolist(), b.tolist(), strict=True)
    estimate = {
        "first_choice": np.mean(a[:, 0] == b[:, 0]),
        "first_or_second": np.mean([not set(x).isdisjoint(y) for x, y in pairs]),  # top-k sets share one
    }
    chance = chance_levels(experts, top_k)
    for key, p in chance.items():
        assert abs(estimate[key] - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-12, key


def test_chance_levels_are_the_papers_for_mixtral() -> None:
    chance = chance_levels(8, 2)
    assert chance["first_choice"] == 0.125  # "1/8 = 12.5%"
    assert round(chance["first_or_second"] * 100) == 46  # "1 - 6/8 x 5/7 ~ 46%"
    with pytest.raises(ValueError):
        chance_levels(4, 5)


def test_repetition_of_random_routing_is_at_chance() -> None:
    rng = np.random.default_rng(7)
    ids = np.argsort(rng.random((50_000, 2, 8)), axis=2)[:, :, :2]  # [T, L, A] independent tokens
    rates, chance = repetition_rates(ids), chance_levels(8, 2)
    for key in ("first_choice", "first_or_second"):
        np.testing.assert_allclose(rates[key], chance[key], atol=0.01)


def test_live_routing_json() -> None:
    counts = [[3, 1, 0, 0], [0, 0, 0, 0], [2, 2, 2, 2]]
    live = live_routing(counts)
    assert json.loads(json.dumps(live)) == live
    assert (live["layers"], live["experts"]) == (3, 4)
    assert live["counts"] == counts
    assert live["assignments"] == [4, 0, 8]
    assert live["proportions"] == [[0.75, 0.25, 0.0, 0.0], [0.0] * 4, [0.25] * 4]
    assert live["imbalance"] == [3.0, None, 1.0]  # max over mean: 3 / 1; nothing routed; perfectly even


# ---------------------------------------------------------------- the real model: transformers as oracle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("routing-tiny"), SPEC)


def test_recorded_ids_match_transformers_router(tiny: Path) -> None:
    tokens = torch.randint(3, 32000, (70,), generator=torch.Generator().manual_seed(4)).tolist()
    model, experts = load_local(tiny)
    ids = record_routing(model, experts, tokens, chunk=16)  # [T, L, A]
    hf = transformers.MixtralForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = torch.stack(hf(torch.tensor([tokens]), output_router_logits=True).router_logits, dim=1)
    scores = logits.sort(dim=-1, descending=True).values  # [T, L, E]
    clear = (scores[..., :TOP_K + 1].diff(dim=-1).abs() > 1e-5).all(dim=-1)  # no near-ties to flip
    assert clear.float().mean() > 0.95
    expected = logits.topk(TOP_K, dim=-1).indices  # [T, L, A], best first
    assert torch.equal(ids[clear], expected[clear])
    assert torch.equal(ids, record_routing(model, experts, tokens, chunk=512))



