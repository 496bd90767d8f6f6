"""`moray routing-report`: plots that are real PNGs, and the report on checkpoints whose gates are
crafted so that each token's experts follow from its token id alone, worked out here with numpy."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from moray.deploy.cli.routing_report import add_arguments, plot_heatmap, routing_report, run
from moray.model.config import MixtralConfig
from moray.model.tiny import TinySpec, make_tiny
from moray.model.tokenizer import Tokenizer

SPEC = TinySpec(layers=3, dim=64, heads=4, kv_heads=2, experts=8, hidden=64, seed=21)
TOP_K = 2  # Mixtral's, which the tiny checkpoints keep
TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog while the river runs past the old mill. " * 3,
    "code": "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n" * 3,
}


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
    buffer = io.BytesIO()
    plot_heatmap(loads, buffer, "load")
    assert_real_png(buffer.getvalue())


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
