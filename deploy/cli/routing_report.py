"""`moray routing-report`: Mixtral's routing analysis (`moray.deploy.routing`) written out and plotted.

It routes each input file (one domain) through the real model, then writes routing.json and the
paper's figures: proportions.png (Figure 7), repetition.png (Figure 8) and heatmap.png (the
layer x expert share of assignments). Plots are drawn on an Agg canvas (no display).

Shape letters: L layers, E experts.
"""

from __future__ import annotations

import argparse
import json
import logging
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

from moray.actors.experts import DTYPES
from moray.deploy.cli.common import fail
from moray.deploy.routing import (
    Rates,
    chance_levels,
    default_layers,
    expert_counts,
    record_routing,
    repetition_rates,
    row_shares,
)

log = logging.getLogger(__name__)


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
        "proportions": row_shares(counts).tolist(),
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
            log.info("%s: %d tokens, routing the first %d", path, len(tokens), limit)
        if len(tokens[:limit]) < 2:
            raise ValueError(f"{path}: fewer than two tokens, nothing to analyse")
        ids = record_routing(model, experts, tokens[:limit], chunk)  # [T, L, A]
        domains[name] = _analyse_domain(path, ids, cfg.n_experts)
        log.info("%s: routed %d tokens through %d layers", name, domains[name]["tokens"], cfg.n_layers)
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
    plot_heatmap(row_shares(total), out / "heatmap.png", "share of assignments, all inputs", "share")


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
        return fail(f"no such input file: {', '.join(missing)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    auto = torch.bfloat16 if device == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else DTYPES[args.dtype]
    report = routing_report(args.model, args.input, args.out, args.max_tokens, device=device, dtype=dtype,
                            chunk=args.chunk)
    chance = report["chance"]
    lines = [f"routing report in {args.out} (chance: first choice {chance['first_choice']:.1%}, "
             f"first or second {chance['first_or_second']:.1%})"]
    for name, domain in report["domains"].items():
        rep = domain["repetition"]
        lines.append(f"  {name}: {domain['tokens']} tokens, repeated first choice "
                     f"{np.mean(rep['first_choice']):.1%}, first or second "
                     f"{np.mean(rep['first_or_second']):.1%} (mean over layers)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
