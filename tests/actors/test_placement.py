"""Placement: coverage and validation, files, vectorised routing against a loop, the EPLB-style planner."""

from __future__ import annotations

import itertools
import logging
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from moray.actors.placement import (
    Placement,
    PlacementError,
    gpu_loads,
    imbalance,
    layer_imbalance,
    load_stats,
    plan_placement,
    plan_report,
    save_stats,
    split_among_replicas,
)


def skewed_loads(layers: int, experts: int, seed: int = 0) -> np.ndarray:
    """Zipf-like per layer (a random expert order per layer), the hottest expert 10x the others' mean."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(layers):
        row = 1000.0 / np.arange(1, experts + 1)[rng.permutation(experts)]  # [E]
        hot = int(np.argmax(row))
        row[hot] = 10 * np.delete(row, hot).mean()
        rows.append(row)
    return np.array(rows)  # [L, E]


def random_placement(layers: int, experts: int, shards: int, extra: int, seed: int) -> Placement:
    """Each expert on a random shard, plus `extra` copies per layer on shards lacking them."""
    rng = np.random.default_rng(seed)
    held: list[list[set[int]]] = [[set() for _ in range(layers)] for _ in range(shards)]
    for layer in range(layers):
        for e in range(experts):
            held[e % shards if e < shards else int(rng.integers(shards))][layer].add(e)
        for _ in range(extra):
            e, g = int(rng.integers(experts)), int(rng.integers(shards))
            held[g][layer].add(e)
    return Placement(slots=tuple(tuple(tuple(sorted(s)) for s in shard) for shard in held))


def route_loop(placement: Placement, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The slow reference: the k-th occurrence (row-major) of expert e goes to its (k mod copies)-th owner."""
    seen: Counter[int] = Counter()
    out = torch.full_like(ids, -1)
    for t in range(ids.shape[0]):
        for a in range(ids.shape[1]):
            e = int(ids[t, a])
            if e < 0:
                continue
            owners = placement.owners(layer, e)
            out[t, a] = owners[seen[e] % len(owners)]
            seen[e] += 1
    return out


# ---- structure -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers,experts,shards", [(4, 8, 1), (4, 8, 3), (2, 4, 4), (3, 7, 2)])
def test_round_robin_covers_every_expert_once(layers: int, experts: int, shards: int) -> None:
    p = Placement.round_robin(layers, experts, shards)
    p.validate(layers, experts)
    assert (p.num_shards, p.num_layers, p.num_experts) == (shards, layers, experts)
    for layer in range(layers):
        for e in range(experts):
            assert p.owners(layer, e) == [e % shards]
    for g in range(shards):
        assert p.shard_experts(g) == {layer: list(range(g, experts, shards)) for layer in range(layers)}


def test_round_robin_refuses_more_shards_than_experts() -> None:
    with pytest.raises(PlacementError, match="some shard would hold no experts"):
        Placement.round_robin(2, 4, 5)


@pytest.mark.parametrize("slots,message", [
    ((((0, 1), (0, 1)), ((2,), (2, 3))), r"layer 0 expert 3"),
    ((((0, 1, 2, 3), (0, 1, 2, 3)), ((), ())), r"shard 1 holds no experts"),
    ((((0, 1), (0, 1)), ((2, 3), (2, 9))), r"shard 1 layer 1: expert ids \[9\] out of range \[0, 4\)"),
    ((((0, 1), (0, 1)), ((2, -1, 3), (2, 3))), r"expert ids \[-1\] out of range"),
    ((((0, 1),), ((2, 3),)), r"shard 0 lists 1 layers, the model has 2"),
    ((((0, 1, 1), (0, 1)), ((2, 3), (2, 3))), r"shard 0 layer 0 lists an expert twice"),
])
def test_validate_names_the_problem(slots: tuple, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        Placement(slots=slots).validate(2, 4)


def test_validate_lists_every_missing_pair_and_is_a_value_error() -> None:
    p = Placement(slots=(((0,), (1,)),))
    with pytest.raises(ValueError, match=r"layer 0 expert 1, layer 1 expert 0"):
        p.validate(2, 2)


def test_redundant_copies_are_owned_by_several_shards() -> None:
    p = Placement(slots=(((0, 1), (0,)), ((0, 2), (1, 2)), ((3,), (3, 0))))
    p.validate(2, 4)
    assert p.owners(0, 0) == [0, 1] and p.owners(1, 0) == [0, 2] and p.owners(1, 3) == [2]
    assert p.copies().tolist() == [[2, 1, 1, 1], [2, 1, 1, 1]]
    assert p.shard_experts(2) == {0: [3], 1: [0, 3]}


def test_shard_experts_leaves_out_empty_layers() -> None:
    p = Placement(slots=(((0, 1), (0, 1)), ((0, 1), ())))
    p.validate(2, 2)
    assert p.shard_experts(1) == {0: [0, 1]}


# ---- files -----------------------------------------------------------------------------------------
def test_json_round_trip(tmp_path: Path) -> None:
    p = random_placement(3, 8, 3, extra=2, seed=1)
    assert Placement.from_json(p.to_json()) == p
    p.save(tmp_path / "placement.json")
    q = Placement.load(tmp_path / "placement.json")
    assert q == p and q.slots == p.slots and hash(q) == hash(p)


def test_from_json_rejects_garbage_and_invalid_files() -> None:
    with pytest.raises(PlacementError, match="not a placement file"):
        Placement.from_json('{"layers": 1}')
    bad = '{"num_layers": 1, "num_experts": 3, "shards": [[[0]], [[1]]]}'
    with pytest.raises(PlacementError, match="layer 0 expert 2"):
        Placement.from_json(bad)


def test_stats_round_trip(tmp_path: Path) -> None:
    loads = np.arange(12, dtype=np.float64).reshape(3, 4)
    save_stats(tmp_path / "stats.json", loads)
    np.testing.assert_array_equal(load_stats(tmp_path / "stats.json"), loads)
    (tmp_path / "bad.json").write_text('{"num_layers": 2, "num_experts": 4, "tokens": [[1, 2, 3, 4]]}')
    with pytest.raises(ValueError, match="header says"):
        load_stats(tmp_path / "bad.json")


# ---- routing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_route_equals_the_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    layers, experts, shards = 3, 8, 1 + seed % 4
    p = random_placement(layers, experts, shards, extra=seed, seed=seed)
    tokens = int(torch.randint(1, 60, (1,), generator=g))
    ids = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(tokens)])  # [T, 2]
    ids[torch.rand(ids.shape, generator=g) < 0.1] = -1  # padding slots
    for layer in range(layers):
        got = p.route(layer, ids)
        assert got.dtype == torch.int64 and got.shape == ids.shape
        torch.testing.assert_close(got, route_loop(p, layer, ids), rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_shards_of_equals_route(seed: int) -> None:
    """The dispatcher's numpy lookup gives what `route` gives, with one copy per expert or several."""
    g = torch.Generator().manual_seed(seed)
    p = random_placement(2, 8, 3, extra=seed, seed=seed)  # extra > 0: some experts have copies
    ids = torch.randint(0, 8, (23, 2), generator=g)
    ids[torch.rand(ids.shape, generator=g) < 0.1] = -1
    for layer in range(2):
        got = p.shards_of(layer, ids.numpy())
        assert got.dtype == np.int64
        assert got.tolist() == p.route(layer, ids).tolist() == route_loop(p, layer, ids).tolist()


def test_one_token_a_step_alternates_the_copies() -> None:
    """Decode steps often give an expert one token: with the caller's `turn` the copies still take
    turns from step to step (without it, every step would send that token to copy 0)."""
    p = Placement(slots=(((0, 1),), ((0, 2),), ((3,),)))
    turn = np.zeros(4, dtype=np.int64)
    got = [p.shards_of(0, np.array([[0, 3]]), turn)[0].tolist() for _ in range(10)]
    assert [g[0] for g in got].count(0) == 5 and [g[0] for g in got].count(1) == 5
    assert all(g[1] == 2 for g in got) and turn.tolist() == [10, 0, 0, 10]
    assert {p.shards_of(0, np.array([[0, 3]]))[0, 0] for _ in range(4)} == {0}  # no turn: copy 0


def test_two_copies_split_tokens_evenly() -> None:
    p = Placement(slots=(((0, 1),), ((0, 2),), ((3,),)))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (101, 1), generator=g)
    ids[::3, 0] = 0
    shard = p.route(0, ids)
    hot = shard[ids == 0]
    n0, n1 = int((hot == 0).sum()), int((hot == 1).sum())
    assert n0 + n1 == int((ids == 0).sum()) and abs(n0 - n1) <= 1
    assert (shard[ids == 3] == 2).all() and (shard[ids == 1] == 0).all()


def test_route_with_loads_favours_the_less_loaded_copy() -> None:
    p = Placement(slots=(((0, 1),), ((0,),)))
    ids = torch.zeros(400, 1, dtype=torch.long)
    shard = p.route(0, ids, loads=[0.0, 10.0])  # damped inverse load: 1/5 : 1/15 = 3 : 1
    assert int((shard == 0).sum()) == 300 and int((shard == 1).sum()) == 100
    even = p.route(0, ids, loads=[4.0, 4.0])
    assert int((even == 0).sum()) == 200


def test_route_survives_pickling() -> None:
    p = random_placement(2, 8, 3, extra=3, seed=5)
    ids = torch.randint(0, 8, (40, 2), generator=torch.Generator().manual_seed(1))
    before = p.route(1, ids)
    torch.testing.assert_close(pickle.loads(pickle.dumps(p)).route(1, ids), before, rtol=0, atol=0)


@pytest.mark.parametrize("n,loads,want", [
    (10, [1.0, 1.0], [5, 5]),
    (11, [1.0, 1.0], [6, 5]),
    (12, [0.0, 10.0], [9, 3]),
    (0, [3.0, 1.0, 2.0], [0, 0, 0]),
    (7, [5.0], [7]),
    (1, [2.0, 1.0], [0, 1]),
])
def test_split_among_replicas(n: int, loads: list[float], want: list[int]) -> None:
    assert split_among_replicas(n, loads) == want


def test_split_among_replicas_is_inverse_proportional() -> None:
    sizes = split_among_replicas(1000, [1.0, 2.0, 3.0])  # damped: 1/(1+2), 1/(2+2), 1/(3+2)
    w = np.array([1 / 3, 1 / 4, 1 / 5])
    np.testing.assert_allclose(sizes, 1000 * w / w.sum(), atol=1)
    assert sum(sizes) == 1000 and sizes[0] > sizes[1] > sizes[2]


# ---- balance metrics -------------------------------------------------------------------------------
def test_gpu_loads_split_each_expert_over_its_copies() -> None:
    p = Placement(slots=(((0,),), ((0, 1),)))
    np.testing.assert_allclose(gpu_loads(p, np.array([[4.0, 2.0]])), [[2.0, 4.0]])
    assert layer_imbalance(p, np.array([[4.0, 2.0]])).tolist() == pytest.approx([4 / 3])


def test_plan_report_by_hand() -> None:
    loads = np.array([[4.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    before = Placement.round_robin(2, 4, 2)  # layer 0: {0, 2} = 5, {1, 3} = 2
    after = Placement(slots=(((0,), (0, 1)), ((1, 2, 3), (2, 3))))
    report = plan_report(before, after, loads)
    assert report["before"]["max_gpu_load"] == [5.0, 2.0] and report["before"]["mean_gpu_load"] == [3.5, 2.0]
    assert report["before"]["imbalance_max"] == pytest.approx(5 / 3.5)
    assert report["before"]["imbalance_mean"] == pytest.approx((5 / 3.5 + 1) / 2)
    assert report["after"]["max_gpu_load"] == [4.0, 2.0] and report["after"]["slots_per_gpu"] == [3, 5]


# ---- planner ---------------------------------------------------------------------------------------
def assert_well_formed(p: Placement, layers: int, experts: int, gpus: int) -> None:
    p.validate(layers, experts)  # every expert has a slot, no GPU empty, no expert twice on a GPU
    assert p.num_shards == gpus and (p.copies() >= 1).all()


@pytest.mark.parametrize("layers,seed", [(4, 0), (8, 1), (32, 2)])
def test_planner_balances_a_skewed_table(layers: int, seed: int) -> None:
    loads = skewed_loads(layers, 8, seed)
    before = Placement.round_robin(layers, 8, 4)
    after = plan_placement(loads, num_gpus=4, redundant=4)
    assert_well_formed(after, layers, 8, 4)
    assert imbalance(before, loads) >= 2.0
    assert layer_imbalance(after, loads).max() <= 1.15
    assert all(sum(map(len, shard)) == 3 * layers for shard in after.slots)  # (8 + 4) / 4 slots per layer
    hottest = loads.argmax(axis=1)
    assert all(after.copies()[layer, hottest[layer]] >= 2 for layer in range(layers))


def test_planned_routing_balances_real_tokens() -> None:
    """Draw tokens from the load table, route them with the plan: per-shard token counts are balanced."""
    loads = skewed_loads(2, 8, seed=3)
    p = plan_placement(loads, num_gpus=4, redundant=4)
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        probs = torch.tensor(loads[layer] / loads[layer].sum())
        ids = torch.multinomial(probs, 20000, replacement=True, generator=g).unsqueeze(1)  # [T, 1]
        per_shard = torch.bincount(p.route(layer, ids).flatten(), minlength=4).double()
        assert float(per_shard.max() / per_shard.mean()) <= 1.15


def test_planner_uniform_load_stays_balanced() -> None:
    loads = np.full((4, 8), 100.0)
    for gpus, redundant in [(4, 0), (4, 4), (2, 2), (8, 0)]:
        p = plan_placement(loads, gpus, redundant)
        assert_well_formed(p, 4, 8, gpus)
        assert imbalance(p, loads) == pytest.approx(1.0)


def test_planner_without_redundancy_places_each_expert_once() -> None:
    loads = skewed_loads(4, 8, seed=4)
    p = plan_placement(loads, num_gpus=4, redundant=0)
    assert_well_formed(p, 4, 8, 4)
    assert (p.copies() == 1).all()
    assert imbalance(p, loads) <= imbalance(Placement.round_robin(4, 8, 4), loads)


def test_planner_single_gpu(caplog: pytest.LogCaptureFixture) -> None:
    loads = skewed_loads(2, 8, seed=5)
    assert plan_placement(loads, 1, 0) == Placement.round_robin(2, 8, 1)
    with caplog.at_level(logging.WARNING):
        p = plan_placement(loads, 1, 3)  # copies on the same GPU are useless: dropped
    assert p == Placement.round_robin(2, 8, 1) and "useful" in caplog.text


def test_planner_more_slots_than_experts() -> None:
    loads = skewed_loads(3, 4, seed=6)
    p = plan_placement(loads, num_gpus=8, redundant=4)  # 8 copies of 4 experts, one per GPU
    assert_well_formed(p, 3, 4, 8)
    assert all(len(shard[layer]) == 1 for shard in p.slots for layer in range(3))
    roomy = plan_placement(loads, num_gpus=2, redundant=1, slots_per_gpu=5)  # 10 slots, 5 copies
    assert_well_formed(roomy, 3, 4, 2)
    assert (roomy.copies().sum(axis=1) == 5).all()


def test_planner_rejects_impossible_requests() -> None:
    loads = np.ones((2, 4))
    with pytest.raises(PlacementError, match="cannot fill 8 GPUs: use redundant >= 4"):
        plan_placement(loads, num_gpus=8, redundant=0)
    with pytest.raises(PlacementError, match="do not fit"):
        plan_placement(loads, num_gpus=2, redundant=2, slots_per_gpu=2)
    with pytest.raises(PlacementError, match="non-negative"):
        plan_placement(-loads, num_gpus=2, redundant=0)


def best_packing_ratio(load: np.ndarray, gpus: int, capacity: int) -> float:
    """Exhaustive oracle: the lowest max/mean over every assignment of experts to GPUs (no copies)."""
    best = np.inf
    for assign in itertools.product(range(gpus), repeat=len(load)):
        count = np.bincount(assign, minlength=gpus)
        if (count <= capacity).all() and (count > 0).all():
            best = min(best, np.bincount(assign, weights=load, minlength=gpus).max())
    return float(best / (load.sum() / gpus))


def test_planner_finds_the_packing_greedy_misses() -> None:
    load = np.array([[3.0, 3.0, 2.0, 2.0, 2.0]])  # greedy alone: {3, 2, 2} = 7 vs {3, 2} = 5; best is 6 / 6
    assert best_packing_ratio(load[0], 2, 3) == pytest.approx(1.0)
    assert imbalance(plan_placement(load, num_gpus=2, redundant=0), load) == pytest.approx(1.0)


def test_planner_is_near_the_exhaustive_optimum() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        experts, gpus = int(rng.integers(4, 8)), int(rng.integers(2, 4))
        load = rng.integers(1, 20, size=experts).astype(np.float64)
        got = imbalance(plan_placement(load[None], gpus, redundant=0), load[None])
        assert got <= 1.07 * best_packing_ratio(load, gpus, -(-experts // gpus))


@pytest.mark.parametrize("loads", [None, [3.0, 0.0, 1.0]])
def test_routed_shards_recombine_to_the_reference_moe(loads: list[float] | None) -> None:
    """The expert-call contract with redundant copies: route, split per shard, each shard's bank computes
    its part, the parts add up to the slow reference MoE (every (token, expert) served exactly once)."""
    from moray.model.experts import ExpertBank, reference_moe, split_by_shard

    g = torch.Generator().manual_seed(0)
    experts, dim, hidden, tokens = 6, 16, 24, 50
    weights = {f"layers.0.experts.{e}.{w}": torch.randn(shape, generator=g) / 4 for e in range(experts)
               for w, shape in (("w1", (hidden, dim)), ("w3", (hidden, dim)), ("w2", (dim, hidden)))}
    p = Placement(slots=(((0, 1, 2),), ((0, 3, 4),), ((0, 1, 5),)))  # expert 0 thrice, expert 1 twice
    x = torch.randn(tokens, dim, generator=g)
    ids = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(tokens)])  # [T, 2]
    ids[::2, 0] = 0
    ids[::2, 1] = torch.where(ids[::2, 1] == 0, 1, ids[::2, 1])
    gates = torch.softmax(torch.randn(tokens, 2, generator=g), dim=-1)
    shard_of = p.route(0, ids, loads)
    y = torch.zeros_like(x)
    for s, (rows, part_ids, part_gates) in enumerate(split_by_shard(ids, gates, shard_of, p.num_shards)):
        if len(rows):
            bank = ExpertBank.from_weights(weights, 0, p.shard_experts(s)[0], experts)
            y.index_add_(0, rows, bank(x[rows], part_ids, part_gates))
    torch.testing.assert_close(y, reference_moe(x, ids, gates, weights, 0, experts))
    assert len(set(shard_of[ids == 0].tolist())) == 3  # the hot expert really was spread
