"""Milliseconds per matmul of the small preset's expert shapes, per kernel: fp32 oneDNN-packed, int8 (the
kernel the probe chooses per row bucket), fp8 (W8A8 `torch._scaled_mm`) and fp8-dequant (weight-only).

    python -m moray.deploy.bench.matmul [--rounds 5] [--threads 2]

Each (shape, rows, kernel) is timed `--rounds` times, interleaved with the others (so a change of load hits
every kernel alike), each round the best of 5 calls after a warm-up; printed as min / median / max (ms).
docs/performance.md, issue 23.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch

from moray.model.kernels import Kernels, LinearWeight, _best_ms
from moray.model.layers import linear, pack_linear
from moray.model.tiny import SMALL

ROWS = (1, 16)


def kernels_for(w: torch.Tensor, cache: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each kernel's packed weight, as a function of the input rows."""
    packed = {
        "fp32 onednn": pack_linear(w, Kernels(force="onednn", cache_dir=cache)),
        "int8 (probed)": pack_linear(w, Kernels(quantize=True, cache_dir=cache)),
        "fp8": pack_linear(w, Kernels(fp8=True, force="fp8")),
        "fp8-dequant": pack_linear(w, Kernels(fp8=True, force="fp8-dequant")),
    }
    return {name: functools.partial(_linear_with, p) for name, p in packed.items()}


def _linear_with(w: LinearWeight, x: torch.Tensor) -> torch.Tensor:
    return linear(x, w)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="/tmp/moray-matmul-bench", help="the int8 probe's choice cache")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shapes = {"w1|w3": (2 * SMALL.hidden, SMALL.dim), "w2": (SMALL.dim, SMALL.hidden)}
    print("| weight [N, K] | rows | kernel | ms min | median | max |\n|---|---:|---|---:|---:|---:|")
    for label, (n, k) in shapes.items():
        runs = kernels_for(torch.randn(n, k, generator=g) * k**-0.5, args.cache)
        for rows in ROWS:
            x = torch.randn(rows, k, generator=g)
            ms: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    ms[name].append(_best_ms(functools.partial(run, x), 5))
            for name, t in ms.items():
                print(f"| {label} [{n}, {k}] | {rows} | {name} | {min(t):.2f} | {statistics.median(t):.2f} "
                      f"| {max(t):.2f} |")


if __name__ == "__main__":
    main()
