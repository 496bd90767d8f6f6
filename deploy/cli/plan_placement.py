"""`moray plan-placement`: an EPLB-style placement from recorded expert loads.

    moray status --stats-out loads.json          # a running app's token counts per (layer, expert)
    moray plan-placement --stats loads.json --gpus 4 --redundant 4 --out placement.json
    moray serve --placement placement.json       # shards as planned

It prints, per layer, the max and mean load per GPU before (round-robin) and after planning.
Letters: L layers, E experts, G shards (GPUs).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from moray.actors.placement import Placement, PlacementError, load_stats, plan_placement, plan_report
from moray.deploy.cli.common import fail, one_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`moray plan-placement` flags."""
    p.add_argument("--stats", required=True,
                   help="token counts per (layer, expert), e.g. from `moray status --stats-out`")
    p.add_argument("--gpus", type=int, required=True, help="expert shards (GPUs) to plan for")
    p.add_argument("--redundant", type=int, default=0, help="extra expert copies per layer (default 0)")
    p.add_argument("--slots-per-gpu", type=int, help="expert slots per GPU (default ceil((E + R) / G))")
    p.add_argument("--out", default="placement.json", help="placement file to write (default placement.json)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")


def run(args: argparse.Namespace) -> int:
    """Plan, write the placement, print max/mean load per GPU before (round-robin) and after."""
    try:
        loads = load_stats(args.stats)  # [L, E]
        after = plan_placement(loads, args.gpus, args.redundant, args.slots_per_gpu)
    except (OSError, ValueError, KeyError) as e:  # PlacementError is a ValueError
        kind = "placement" if isinstance(e, PlacementError) else f"stats file {args.stats}"
        return fail(f"{kind}: {one_line(e)}")
    before = _round_robin(loads.shape, args.gpus)
    after.save(args.out)
    report = plan_report(before or after, after, loads)
    if before is None:
        report["before"] = None
    report["placement"] = str(args.out)
    sys.stdout.write(json.dumps(report) + "\n" if args.json else format_report(report))
    return 0


def _round_robin(shape: tuple[int, ...], gpus: int) -> Any:
    """The default placement over `gpus` shards, None when there are more GPUs than experts."""
    layers, experts = shape
    return Placement.round_robin(layers, experts, gpus) if gpus <= experts else None


def format_report(report: Mapping[str, Any]) -> str:
    """A table: per layer, max and mean load per GPU and max/mean, round-robin vs planned."""
    before, after = report["before"], report["after"]
    lines = [f"{'layer':>5}  {'before max/mean':>22}  {'ratio':>6}  {'after max/mean':>22}  {'ratio':>6}"]
    for layer in range(len(after["max_gpu_load"])):
        old = _cells(before, layer) if before else f"{'-':>22}  {'-':>6}"
        lines.append(f"{layer:>5}  {old}  {_cells(after, layer)}")
    summary = (f"max/mean load per GPU (mean over layers): before {before['imbalance_mean']:.3f}, "
               if before else "max/mean load per GPU (mean over layers): before -, ")
    lines.append(summary + f"after {after['imbalance_mean']:.3f} (worst layer {after['imbalance_max']:.3f})")
    lines.append(f"wrote {report['placement']} ({after['num_shards']} shards; expert slots per GPU, "
                 f"all layers: {after['slots_per_gpu']}): moray serve --placement {report['placement']}")
    return "\n".join(lines) + "\n"


def _cells(side: Mapping[str, Any], layer: int) -> str:
    hi, mean = side["max_gpu_load"][layer], side["mean_gpu_load"][layer]
    ratio = hi / mean if mean > 0 else 1.0
    return f"{hi:>10.1f} / {mean:>9.1f}  {ratio:>6.3f}"
