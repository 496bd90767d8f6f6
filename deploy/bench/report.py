"""The benchmark's report: machine facts, ratios against transformers and the bandwidth bound, the
Markdown tables, the soak table and the PNG plots (matplotlib, from the `tools` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from moray.deploy.bench.hop import hop_markdown
from moray.deploy.bench.measure import _read, bound


def new_report(args: argparse.Namespace, facts: dict[str, Any] | None) -> dict[str, Any]:
    workload = {"prompt_len": str(args.prompt_len), "output_len": str(args.output_len),
                "num_requests": args.num_requests or "= concurrency", "concurrency": args.concurrency,
                "seed": args.seed, "max_batch_tokens": args.max_batch_tokens, "greedy": True,
                "ignore_eos": True, "threads": args.threads or "default",
                "omp_wait_policy": args.omp_wait_policy, "constrained": args.constrained}
    return {"moray_bench": 1, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(),
            "model": facts, "preset": args.preset, "workload": workload, "runs": [], "bandwidth": None}


def machine_info() -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal")), None)
    versions: dict[str, str | None] = {}
    for pkg in ("torch", "ray", "transformers"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "versions": versions, "load_avg_start": os.getloadavg()}


def finish_report(report: dict[str, Any], facts: dict[str, Any] | None,
                  touched: dict[int, float | None]) -> None:
    """Ratios against the fastest transformers variant at the same concurrency, and each run against
    the bandwidth bound."""
    report["machine"]["load_avg_end"] = os.getloadavg()
    base: dict[int, float] = {}
    for r in report["runs"]:
        if r["system"].startswith("transformers"):
            base[r["concurrency"]] = max(base.get(r["concurrency"], 0.0), r["output_tokens_per_s"])
    bw = (report.get("bandwidth") or {}).get("copy_bytes_per_s")
    for r in report["runs"]:
        c = r["concurrency"]
        r["vs_transformers"] = r["output_tokens_per_s"] / base[c] if base.get(c) else None
        if facts and bw:
            r["bound"] = bound(facts, bw, c, r.get("decode_tokens_per_s"), touched.get(c))


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{1e3 * x:.1f}"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "–" if x is None else format(x, fmt)


def markdown(report: dict[str, Any]) -> str:
    """Two tables: throughput/latency per run, and the engine step split where it was read."""
    lines = ["| system | conc | output tok/s | × transformers | prefill tok/s | decode tok/s | req/s "
             "| TTFT p50 / p99 ms | ITL p50 / p90 / p99 ms | % of bw bound | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        ttft, itl, b = r["ttft_s"], r["itl_s"], r.get("bound") or {}
        frac = b.get("fraction")
        lines.append(
            f"| {r['system']} | {r['concurrency']} | {r['output_tokens_per_s']:.1f} "
            f"| {_num(r.get('vs_transformers'), '.2f')} | {_num(r.get('prefill_tokens_per_s'))} "
            f"| {_num(r.get('decode_tokens_per_s'))} | {r['requests_per_s']:.2f} "
            f"| {_ms(ttft['p50'])} / {_ms(ttft['p99'])} "
            f"| {_ms(itl['p50'])} / {_ms(itl['p90'])} / {_ms(itl['p99'])} "
            f"| {'–' if frac is None else f'{100 * frac:.0f}%'} | {r['errors']} |")
    split = [r for r in report["runs"] if r.get("step")]
    if split:
        lines += ["", "| system | conc | tokens/step | ms/step | attention | router (est.) | transport "
                  "| expert compute | sampling | outside compute | engine busy | shard utilization |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in split:
            s, ms = r["step"], r["step"]["ms_per_step"]
            util = s.get("shard_utilization")
            lines.append(
                f"| {r['system']} | {r['concurrency']} | {s['tokens_per_step']:.1f} | {ms['total']:.1f} "
                f"| {_num(ms['attention'])} | {ms['router']:.2f} | {_transport(s)} "
                f"| {ms['expert_compute']:.1f} "
                f"| {ms['sampling']:.1f} | {_num(_pct(s['outside_compute_fraction']), '.0f')}% "
                f"| {_num(_pct(s['engine_busy_fraction']), '.0f')}% "
                f"| {' / '.join(f'{100 * u:.0f}%' for u in util) if util else '–'} |")
    return "\n".join(lines) + "\n"


def _transport(step: dict[str, Any]) -> str:
    ms = step["ms_per_step"]
    if step.get("overlapped"):
        return f"overlapped (waits {ms['expert_wait_summed']:.1f})"
    return f"{ms['transport']:.1f}"


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def header(report: dict[str, Any]) -> str:
    m, model, bw = report["machine"], report.get("model"), report.get("bandwidth") or {}
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['versions'].get('torch')} "
           f"({m['torch_threads']} threads), load average at start {m['load_avg_start'][0]:.1f}."]
    if bw:
        out.append(f"Memory: copy {bw['copy_bytes_per_s'] / 1e9:.1f} GB/s (read+write), "
                   f"read {bw['read_bytes_per_s'] / 1e9:.1f} GB/s.")
    if model:
        out.append(f"Model: dim {model['dim']}, hidden {model['hidden_dim']}, {model['n_layers']} layers, "
                   f"{model['n_experts']} experts (top-{model['top_k']}), {model['n_heads']} heads / "
                   f"{model['n_kv_heads']} KV heads, {model['weight_bytes'] / 1e9:.2f} GB fp32.")
    w = report["workload"]
    if w is None:  # --hop: no requests
        return "\n".join(out) + "\n"
    out.append(f"Workload: prompt {w['prompt_len']} tokens, output {w['output_len']} tokens, greedy, "
               f"requests per level {w['num_requests']}.")
    return "\n".join(out) + "\n"


def soak_markdown(soak: dict[str, Any]) -> str:
    lines = ["| process | pid | samples | RSS first MB | after warm-up MB | last MB | max MB | growth "
             "| growth after warm-up |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in soak["processes"]:
        lines.append(f"| {p['name']} | {p['pid']} | {p['samples']} | {p['rss_first'] / 1e6:.0f} "
                     f"| {p['rss_after_warmup'] / 1e6:.0f} | {p['rss_last'] / 1e6:.0f} "
                     f"| {p['rss_max'] / 1e6:.0f} "
                     f"| {p['growth']:+.1%} | {p['growth_after_warmup']:+.1%} |")
    return "\n".join(lines) + "\n"


def kernels_markdown(kernels: dict[str, dict[str, Any]]) -> str:
    """The linear kernel each in-process system's probe chose per weight shape and row bucket, with the
    best time of every candidate (ms)."""
    lines = ["\n| system | weights | rows | chosen | candidates (ms) |", "|---|---|---:|---|---|"]
    for system, choices in kernels.items():
        for key, choice in choices.items():
            by_rows = dict(choice["by_rows"])
            for rows, times in (choice["ms"] or {"-": {}}).items():
                cands = ", ".join(f"{k} {t:.3f}" for k, t in times.items()) or "not probed"
                chosen = by_rows.get(int(rows), choice["layout"]) if rows != "-" else choice["layout"]
                lines.append(f"| {system} | {key} | {rows} | {chosen} | {cands} |")
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> None:
    import sys

    text = header(report) + "\n" + (markdown(report) if report["runs"] else "")
    if report.get("kernels"):
        text += kernels_markdown(report["kernels"]) + "\n"
    if report.get("hop"):
        text += hop_markdown(report["hop"]) + "\n"
    if report.get("soak"):
        text += "\n" + soak_markdown(report["soak"])
    notes = report.get("notes") or []
    text += "".join(f"\n- {note}" for note in notes) + ("\n" if notes else "")
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot:
        write_plots(report, Path(args.plot))


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """throughput.png and itl_p99.png (per system over concurrency), step_split.png (stacked ms/step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    systems = list(dict.fromkeys(r["system"] for r in report["runs"]))
    paths = []
    for key, label, fname in (("output_tokens_per_s", "output tokens/s", "throughput.png"),
                              ("itl_p99_ms", "ITL p99 (ms)", "itl_p99.png")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for s in systems:
            runs = [r for r in report["runs"] if r["system"] == s]
            ys = [r[key] if key in r else 1e3 * (r["itl_s"]["p99"] or 0.0) for r in runs]
            ax.plot([r["concurrency"] for r in runs], ys, marker="o", label=s)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="concurrency", ylabel=label)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / fname)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    paths.append(_plot_split(report, out_dir / "step_split.png", plt))
    return paths


def _plot_split(report: dict[str, Any], path: Path, plt: Any) -> Path:
    runs = [r for r in report["runs"] if r.get("step")]
    parts = ("attention", "router", "transport", "expert_compute", "sampling")
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(runs) + 2), 4))
    bottom = [0.0] * len(runs)
    for part in parts:
        ys = [r["step"]["ms_per_step"][part] or 0.0 for r in runs]
        ax.bar(range(len(runs)), ys, bottom=bottom, label=part)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_xticks(range(len(runs)), [f"{r['system']}\nc={r['concurrency']}" for r in runs], fontsize=6,
                  rotation=30)
    ax.set(ylabel="ms per engine step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
