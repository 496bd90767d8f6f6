"""Where the router sends tokens: Mixtral's routing analysis (arXiv 2401.04088, §5), offline and live.

Offline, `moray routing-report` runs text through the real model (no serving) and records the
router's top-k choices for every token at every layer, then writes the paper's two analyses:

- Figure 7, expert proportions: the share of assignments each expert receives, per layer, per domain
  (one input file is one domain). Every token counts once for each of its k chosen experts, so a
  layer's proportions sum to 1 (with top-2, one expert can get at most half).
- Figure 8 / Table 5, temporal locality: "the proportion of times the same expert is assigned to a
  token i and its following token i+1". "First choice": consecutive tokens whose highest-weighted
  expert is the same. "First or second choice": the same expert appears among the top-2 of both
  consecutive tokens, i.e. their top-k sets share at least one expert (for any k, we report the
  overlap of the top-k sets). The paper's reference for random assignments, 1/8 = 12.5% and
  1 - 6/8 · 5/7 ≈ 46% for 8 experts, is derived here from E and k (`chance_levels`): two tokens
  whose choices are independent uniform draws repeat their first choice with probability 1/E, and
  their k-sets are disjoint with probability C(E-k, k) / C(E, k).

Live, the server counts tokens per (layer, expert); `live_routing` turns those counters into the
JSON of `GET /v1/moray/routing`, and `plot_heatmap` draws the layer × expert load picture that both
the report and the server show.

Shape letters: T tokens, L layers, E experts, A active experts per token (top-k).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm

from moray.model.kv_cache import KVCache
from moray.model.layers import StepBatch
from moray.model.mixtral import ExpertBackend, Mixtral

logger = logging.getLogger(__name__)

KV_BLOCK_SIZE = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Rates = dict[str, np.ndarray]  # "first_choice" / "first_or_second" -> [L]


# ---------------------------------------------------------------- recording


class _RecordingExperts:
    """An expert backend that forwards every call and keeps the router's ids, layer by layer."""

    def __init__(self, inner: ExpertBackend, n_layers: int) -> None:
        self.inner = inner
        self.ids: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    async def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor,
                       gates: torch.Tensor) -> torch.Tensor:
        self.ids[layer].append(ids.cpu())  # [T, A]
        return await self.inner(layer, x, ids, gates)


def record_routing(model: Mixtral, experts: ExpertBackend, tokens: list[int],
                   chunk: int = 512) -> torch.Tensor:
    """The router's top-k expert ids [T, L, A] (best first) for one sequence, run forward in chunks.

    The tokens go through the real forward pass, prefill chunk by prefill chunk through a KV cache,
    so every layer routes the hidden states the model itself computes. Runs its own event loop:
    call it from synchronous code.
    """
    cfg = model.cfg
    if len(tokens) > cfg.max_seq_len:
        raise ValueError(f"{len(tokens)} tokens exceed the model's max_seq_len {cfg.max_seq_len}")
    if not tokens:
        return torch.empty((0, cfg.n_layers, cfg.top_k), dtype=torch.long)
    recorder = _RecordingExperts(experts, cfg.n_layers)
    blocks = list(range(-(-len(tokens) // KV_BLOCK_SIZE)))
    kv = KVCache(cfg, len(blocks), KV_BLOCK_SIZE, model.dtype, model.device)

    async def run_chunks() -> None:
        for start in tqdm(range(0, len(tokens), chunk), desc="routing", unit="chunk", leave=False):
            batch = StepBatch.for_sequence(tokens[start:start + chunk], start, blocks, KV_BLOCK_SIZE)
            await model.forward_step(batch.to(model.device), kv, recorder)

    with torch.inference_mode():
        asyncio.run(run_chunks())
    return torch.stack([torch.cat(per_layer) for per_layer in recorder.ids], dim=1)  # [T, L, A]


# ---------------------------------------------------------------- analysis (pure numpy)


def expert_counts(ids: np.ndarray | torch.Tensor, num_experts: int) -> np.ndarray:
    """Assignments per (layer, expert) [L, E]: each token counts once for each chosen expert."""
    ids = np.asarray(ids)  # [T, L, A]
    _, n_layers, _ = ids.shape
    flat = ids + num_experts * np.arange(n_layers)[None, :, None]  # [T, L, A], unique per (layer, expert)
    return np.bincount(flat.ravel(), minlength=n_layers * num_experts).reshape(n_layers, num_experts)


def expert_proportions(ids: np.ndarray | torch.Tensor, num_experts: int) -> np.ndarray:
    """Share of each layer's assignments that each expert receives [L, E]; rows sum to 1 (0 if T = 0)."""
    return _row_shares(expert_counts(ids, num_experts))


def _row_shares(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)  # [L, 1]
    return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)


def repetition_rates(ids: np.ndarray | torch.Tensor) -> Rates:
    """Per layer, the share of consecutive token pairs (i, i+1) that repeat an expert.

    `first_choice` [L]: both tokens' first (highest-weighted) expert is the same.
    `first_or_second` [L]: the two tokens' top-k sets share at least one expert.
    Needs ids sorted best first along A (as `torch.topk` returns them) and T >= 2.
    """
    ids = np.asarray(ids)  # [T, L, A]
    if ids.shape[0] < 2:
        raise ValueError("repetition rates need at least two tokens")
    prev, nxt = ids[:-1], ids[1:]  # [T-1, L, A]
    first = prev[:, :, 0] == nxt[:, :, 0]  # [T-1, L]
    overlap = (prev[:, :, :, None] == nxt[:, :, None, :]).any(axis=(2, 3))  # [T-1, L]
    return {"first_choice": first.mean(axis=0), "first_or_second": overlap.mean(axis=0)}


def chance_levels(num_experts: int, top_k: int) -> dict[str, float]:
    """The repetition rates of random routing: each token's ordered top-k drawn uniformly, independently.

    First choice: P(two uniform draws from E agree) = 1/E.
    First or second choice: 1 - P(two uniform k-subsets of E are disjoint) = 1 - C(E-k, k) / C(E, k)
    (math.comb(E-k, k) is 0 when 2k > E: the sets must then overlap).
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
    disjoint = math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return {"first_choice": 1.0 / num_experts, "first_or_second": 1.0 - disjoint}


def default_layers(n_layers: int) -> list[int]:
    """First, middle and last layer, as the paper shows (0, 15, 31 of 32)."""
    return sorted({0, (n_layers - 1) // 2, n_layers - 1})


# ---------------------------------------------------------------- plots (Agg canvas, no display)


def _save(fig: Figure, path: str | Path | BinaryIO) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")


def plot_proportions(per_domain: Mapping[str, np.ndarray], path: str | Path | BinaryIO,
                     layers: Sequence[int] | None = None) -> None:
    """Figure 7 layout: one panel per layer; per expert a group of bars, one bar per domain."""
    first = next(iter(per_domain.values()))  # [L, E]
    n_layers, n_experts = first.shape
    layers = list(layers) if layers is not None else default_layers(n_layers)
    fig = Figure(figsize=(max(4.0, 0.9 * n_experts + 1.5), 2.6 * len(layers)), layout="constrained")
    width = 0.8 / len(per_domain)
    for row, layer in enumerate(layers):
        ax = fig.add_subplot(len(layers), 1, row + 1)
        for j, (name, props) in enumerate(per_domain.items()):
            offset = (j - (len(per_domain) - 1) / 2) * width
            ax.bar(np.arange(n_experts) + offset, props[layer], width, label=name)
        ax.axhline(1.0 / n_experts, color="grey", linestyle="--", linewidth=1)  # uniform share
        ax.set_title(f"layer {layer}")
        ax.set_xticks(np.arange(n_experts))
        ax.set_ylabel("selection proportion")
    ax.set_xlabel("expert")
    fig.axes[0].legend(fontsize="small", ncol=min(4, len(per_domain)))
    _save(fig, path)


def plot_repetition(per_domain: Mapping[str, Rates], chance: Mapping[str, float],
                    path: str | Path | BinaryIO) -> None:
    """Figure 8 layout: repeated-assignment rate against layer, one line per domain, chance dashed."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    panels = {"first_choice": "First choice", "first_or_second": "First or second choice"}
    for col, (key, title) in enumerate(panels.items()):
        ax = fig.add_subplot(1, 2, col + 1)
        for name, rates in per_domain.items():
            ax.plot(np.arange(len(rates[key])), rates[key], marker="o", markersize=3, label=name)
        ax.axhline(chance[key], color="black", linestyle="--", linewidth=1, label=f"chance {chance[key]:.1%}")
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
        ax.set_ylim(0, 1.02)
    fig.axes[0].set_ylabel("proportion of repeated assignments")
    _save(fig, path)


def plot_heatmap(loads: np.ndarray, path: str | Path | BinaryIO, title: str, label: str = "tokens") -> None:
    """Layer × expert load heatmap of `loads` [L, E] (counts or shares), values written in small maps."""
    loads = np.asarray(loads, dtype=float)  # [L, E]
    n_layers, n_experts = loads.shape
    size = (max(4.0, 0.6 * n_experts + 2), max(2.5, 0.35 * n_layers + 1.2))
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(loads, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xticks(np.arange(n_experts))
    ax.set_yticks(np.arange(n_layers))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    if loads.size <= 256:
        _annotate(ax, loads)
    _save(fig, path)


def _annotate(ax: Axes, loads: np.ndarray) -> None:
    """Write each cell's value, dark on the bright half of the colour map, light on the dark half."""
    integral = bool(np.all(loads == np.round(loads)))
    middle = (loads.min() + loads.max()) / 2
    for (layer, expert), value in np.ndenumerate(loads):
        text = f"{value:.0f}" if integral else f"{value:.2f}"
        colour = "black" if value > middle else "white"
        ax.text(expert, layer, text, ha="center", va="center", fontsize=7, color=colour)


def heatmap_png(loads: np.ndarray, title: str, label: str = "tokens") -> bytes:
    """`plot_heatmap` into PNG bytes (for a server response)."""
    buffer = io.BytesIO()
    plot_heatmap(loads, buffer, title, label)
    return buffer.getvalue()


# ---------------------------------------------------------------- live


def live_routing(token_counts: Sequence[Sequence[int]] | np.ndarray) -> dict[str, Any]:
    """JSON for `GET /v1/moray/routing` from the server's tokens per (layer, expert) [L][E].

    `proportions` [L][E]: each layer's share per expert (0 when the layer saw nothing).
    `imbalance` [L]: the hottest expert's count over the mean count per expert (1 = perfectly even;
    null when the layer saw no tokens).
    """
    counts = np.asarray(token_counts, dtype=np.int64)  # [L, E]
    if counts.ndim != 2:
        raise ValueError(f"token counts must be [layers][experts], got shape {counts.shape}")
    n_layers, n_experts = counts.shape
    totals = counts.sum(axis=1)  # [L]
    imbalance = [float(c.max() * n_experts / t) if t > 0 else None
                 for c, t in zip(counts, totals, strict=True)]
    return {
        "layers": n_layers,
        "experts": n_experts,
        "counts": counts.tolist(),
        "assignments": totals.tolist(),
        "proportions": _row_shares(counts).tolist(),
        "imbalance": imbalance,
    }


# ---------------------------------------------------------------- the report


def _domain_names(inputs: Sequence[Path]) -> dict[str, Path]:
    """One domain per file, named by its stem (made unique with the file's position when repeated)."""
    stems = [p.stem for p in inputs]
    return {(s if stems.count(s) == 1 else f"{s}-{i}"): p
            for i, (s, p) in enumerate(zip(stems, inputs, strict=True))}


def _analyse_domain(path: Path, ids: torch.Tensor, num_experts: int) -> dict[str, Any]:
    counts = expert_counts(ids, num_experts)  # [L, E]
    rates = repetition_rates(ids)
    return {
        "file": str(path),
        "tokens": int(ids.shape[0]),
        "counts": counts.tolist(),
        "proportions": _row_shares(counts).tolist(),
        "repetition": {k: v.tolist() for k, v in rates.items()},
    }


def routing_report(model_dir: str | Path, inputs: Sequence[str | Path], out_dir: str | Path,
                   max_tokens_per_file: int = 2048, *, device: str | torch.device | None = None,
                   dtype: torch.dtype = torch.float32, chunk: int = 512) -> dict[str, Any]:
    """Route each input file through the model; write routing.json, proportions/repetition/heatmap PNGs.

    Each file is one domain: its text is tokenized (with BOS, as the tokenizer encodes a prompt) and
    cut to `max_tokens_per_file` (and to the model's context). Returns what routing.json holds.
    """
    from moray.model.mixtral import load_local
    from moray.model.tokenizer import Tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, experts = load_local(model_dir, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_model_dir(model_dir)
    cfg, limit = model.cfg, min(max_tokens_per_file, model.cfg.max_seq_len)
    domains: dict[str, dict[str, Any]] = {}
    for name, path in _domain_names([Path(p) for p in inputs]).items():
        tokens = tokenizer.encode(path.read_text(encoding="utf-8"))
        if len(tokens) > limit:
            logger.info("%s: %d tokens, routing the first %d", path, len(tokens), limit)
        if len(tokens[:limit]) < 2:
            raise ValueError(f"{path}: fewer than two tokens, nothing to analyse")
        ids = record_routing(model, experts, tokens[:limit], chunk)  # [T, L, A]
        domains[name] = _analyse_domain(path, ids, cfg.n_experts)
        logger.info("%s: routed %d tokens through %d layers", name, domains[name]["tokens"], cfg.n_layers)
    report = {
        "model": str(model_dir),
        "layers": cfg.n_layers,
        "experts": cfg.n_experts,
        "top_k": cfg.top_k,
        "chance": chance_levels(cfg.n_experts, cfg.top_k),
        "domains": domains,
    }
    _write_report(report, Path(out_dir))
    return report


def _write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(report, indent=2))
    domains = report["domains"]
    plot_proportions({n: np.array(d["proportions"]) for n, d in domains.items()}, out / "proportions.png")
    rates = {n: {k: np.array(v) for k, v in d["repetition"].items()} for n, d in domains.items()}
    plot_repetition(rates, report["chance"], out / "repetition.png")
    total = np.sum([d["counts"] for d in domains.values()], axis=0)  # [L, E]
    plot_heatmap(_row_shares(total), out / "heatmap.png", "share of assignments, all inputs", "share")


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`moray routing-report`: the options of the offline routing analysis."""
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint directory (default: the embedded tiny model)")
    parser.add_argument("--input", type=Path, nargs="+", required=True,
                        help="text files, one per domain")
    parser.add_argument("--out", type=Path, default=Path("routing-report"), help="output directory")
    parser.add_argument("--max-tokens", type=int, default=2048, help="tokens routed per input file")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk size")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs ('auto' = cuda when a GPU is visible, else cpu)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="float32",
                        help="weights dtype (default float32: routing decisions at full precision; "
                             "'auto' = bfloat16 on cuda, float32 on cpu, as served)")


def run(args: argparse.Namespace) -> int:
    """Run the report; print where it went and each domain's mean repetition against chance."""
    if args.model is None:
        from moray.model.tiny import default_model_dir

        args.model = default_model_dir()
    missing = [str(p) for p in args.input if not p.is_file()]
    if missing:
        sys.stderr.write(f"moray: error: no such input file: {', '.join(missing)}\n")
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    auto = torch.bfloat16 if device == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else DTYPES[args.dtype]
    report = routing_report(args.model, args.input, args.out, args.max_tokens, device=device, dtype=dtype,
                            chunk=args.chunk)
    chance = report["chance"]
    print(f"routing report in {args.out} (chance: first choice {chance['first_choice']:.1%}, "
          f"first or second {chance['first_or_second']:.1%})")
    for name, domain in report["domains"].items():
        rep = domain["repetition"]
        print(f"  {name}: {domain['tokens']} tokens, repeated first choice "
              f"{np.mean(rep['first_choice']):.1%}, first or second {np.mean(rep['first_or_second']):.1%} "
              "(mean over layers)")
    return 0
