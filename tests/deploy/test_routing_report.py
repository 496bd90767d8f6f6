"""Routing analysis (Mixtral §5): recorded router choices, proportions, repetition rates, plots, live JSON.

Oracles: transformers' router logits for what the router chose; hand-counted ids arrays; a Monte Carlo
estimate of the chance levels (and the paper's published 12.5% / 46%); and checkpoints whose gates
are crafted so that each token's experts follow from its token id alone, worked out here with numpy.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from moray.deploy.routing import (
    add_arguments,
    chance_levels,
    expert_proportions,
    heatmap_png,
    live_routing,
    plot_heatmap,
    record_routing,
    repetition_rates,
    routing_report,
    run,
)
from moray.model.config import MixtralConfig
from moray.model.mixtral import load_local
from moray.model.tiny import TinySpec, make_tiny
from moray.model.tokenizer import Tokenizer

SPEC = TinySpec(layers=3, dim=64, heads=4, kv_heads=2, experts=8, hidden=64, seed=21)
TOP_K = 2  # Mixtral's, which the tiny checkpoints keep
TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog while the river runs past the old mill. " * 3,
    "code": "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n" * 3,
}


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


# ---------------------------------------------------------------- images


def assert_real_png(path: Path | bytes) -> None:
    image = Image.open(path if isinstance(path, Path) else io.BytesIO(path))
    assert image.format == "PNG"
    assert image.width > 0 and image.height > 0
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 1, "a single flat colour"


def test_heatmap_png(tmp_path: Path) -> None:
    loads = np.arange(24).reshape(3, 8)
    plot_heatmap(loads, tmp_path / "h.png", "load")
    assert_real_png(tmp_path / "h.png")
    assert_real_png(heatmap_png(loads, "load"))


# ---------------------------------------------------------------- the real model: transformers as oracle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("routing-tiny"), SPEC)


def test_recorded_ids_match_transformers_router(tiny: Path) -> None:
    transformers = pytest.importorskip("transformers")
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



# ---------------------------------------------------------------- crafted gates: known routing


def craft_gates(model_dir: Path, positive: np.ndarray, negative: np.ndarray, signs: np.ndarray) -> None:
    """Make every token's experts a function of its id alone.

    Residual dims 0 and 1 carry constants from the embedding (1 and the token's sign), and nothing
    writes to them afterwards (zero rows 0-1 of every o_proj and expert w2), so the router input x
    at every layer is r·(1, sign, 0...) plus other dims, with r > 0 the RMSNorm scale. The gate reads
    only dims 0-1, so expert e scores r·positive[l, e] for a +1 token and r·negative[l, e] for a -1 token.
    """
    a, b = (positive + negative) / 2, (positive - negative) / 2  # [L, E]: a + b = positive, a - b = negative
    for file in model_dir.glob("*.safetensors"):
        tensors = load_file(file)
        for name, t in tensors.items():
            if name == "model.embed_tokens.weight":
                t[:, 0], t[:, 1] = 1.0, torch.tensor(signs, dtype=t.dtype)
            elif name.endswith("self_attn.o_proj.weight") or name.endswith(".w2.weight"):
                t[:2] = 0.0
            elif name.endswith("post_attention_layernorm.weight"):
                t[:2] = 1.0
            elif name.endswith("block_sparse_moe.gate.weight"):
                layer = int(name.split(".")[2])
                t.zero_()
                t[:, 0], t[:, 1] = torch.tensor(a[layer]), torch.tensor(b[layer])
        save_file(tensors, file, metadata={"format": "pt"})


def expected_routing(tokens: list[int], positive: np.ndarray, negative: np.ndarray,
                     signs: np.ndarray, k: int) -> list[list[list[int]]]:
    """Per token, per layer: the k best experts by the crafted score, best first."""
    out = []
    for tok in tokens:
        scores = positive if signs[tok] > 0 else negative  # [L, E]
        out.append([sorted(range(scores.shape[1]), key=lambda e: -row[e])[:k] for row in scores])
    return out


def count_by_hand(routes: list[list[list[int]]], layer: int, experts: int) -> list[int]:
    counts = [0] * experts
    for token in routes:
        for e in token[layer]:
            counts[e] += 1
    return counts


def repeats_by_hand(routes: list[list[list[int]]], layer: int) -> tuple[float, float]:
    pairs = list(zip(routes[:-1], routes[1:], strict=True))
    first = sum(a[layer][0] == b[layer][0] for a, b in pairs)
    either = sum(bool(set(a[layer]) & set(b[layer])) for a, b in pairs)
    return first / len(pairs), either / len(pairs)


def crafted_checkpoint(tmp_path: Path, positive: np.ndarray, negative: np.ndarray,
                       seed: int) -> tuple[Path, np.ndarray]:
    """A tiny checkpoint with crafted gates, and the ±1 sign of every token id [V]."""
    model_dir = make_tiny(tmp_path / "model", SPEC)
    vocab = MixtralConfig.load(model_dir).vocab_size
    signs = np.where(np.random.default_rng(seed).random(vocab) < 0.5, 1.0, -1.0)
    craft_gates(model_dir, positive, negative, signs)
    return model_dir, signs


def write_inputs(tmp_path: Path) -> list[Path]:
    paths = []
    for name, text in TEXTS.items():
        paths.append(tmp_path / f"{name}.txt")
        paths[-1].write_text(text)
    return paths


def test_constant_router_gives_half_and_half_and_full_repetition(tmp_path: Path) -> None:
    # Same ordering whatever the token: layer 0 prefers 5 then 2, layer 1 prefers 0 then 7, layer 2 3 then 4.
    scores = np.zeros((3, 8))
    scores[0, [5, 2]] = [9, 8]
    scores[1, [0, 7]] = [9, 8]
    scores[2, [3, 4]] = [9, 8]
    scores += np.arange(8) / 10  # distinct losers too
    model_dir, _ = crafted_checkpoint(tmp_path, scores, scores, seed=1)
    report = routing_report(model_dir, write_inputs(tmp_path), tmp_path / "out", device="cpu")
    for domain in report["domains"].values():
        for layer, (first, second) in enumerate([(5, 2), (0, 7), (3, 4)]):
            expected = [0.0] * 8
            expected[first] = expected[second] = 0.5
            assert domain["proportions"][layer] == expected
        assert domain["repetition"]["first_choice"] == [1.0, 1.0, 1.0]
        assert domain["repetition"]["first_or_second"] == [1.0, 1.0, 1.0]



def test_token_dependent_router_gives_exact_proportions_and_repetition(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    positive = np.stack([rng.permutation(8) for _ in range(3)]).astype(float)  # [L, E] distinct integers
    negative = np.stack([rng.permutation(8) for _ in range(3)]).astype(float)
    model_dir, signs = crafted_checkpoint(tmp_path, positive, negative, seed=3)
    inputs = write_inputs(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(model_dir), "--input", *map(str, inputs),
                              "--out", str(tmp_path / "out"), "--max-tokens", "40", "--chunk", "16"])
    assert run(args) == 0

    report = json.loads((tmp_path / "out" / "routing.json").read_text())
    assert report["chance"] == {"first_choice": 1 / 8, "first_or_second": 1 - 15 / 28}
    assert (report["layers"], report["experts"], report["top_k"]) == (3, 8, 2)
    tokenizer = Tokenizer.from_model_dir(model_dir)
    for path in inputs:
        tokens = tokenizer.encode(path.read_text())[:40]
        routes = expected_routing(tokens, positive, negative, signs, k=2)
        domain = report["domains"][path.stem]
        assert domain["tokens"] == len(tokens) == 40
        for layer in range(3):
            counts = count_by_hand(routes, layer, 8)
            assert domain["counts"][layer] == counts
            assert domain["proportions"][layer] == [c / (2 * len(tokens)) for c in counts]
            first, either = repeats_by_hand(routes, layer)
            assert domain["repetition"]["first_choice"][layer] == first
            assert domain["repetition"]["first_or_second"][layer] == either
    # The crafted routing is not trivial: both signs occur, so choices really vary with the token.
    assert any(0 < r < 1 for d in report["domains"].values() for r in d["repetition"]["first_choice"])
    for name in ("proportions.png", "repetition.png", "heatmap.png"):
        assert_real_png(tmp_path / "out" / name)
