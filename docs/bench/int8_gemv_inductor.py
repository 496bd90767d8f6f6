"""Per-matmul times of the int8 weight-only candidates against fp32 oneDNN-packed, at the small preset's
expert shapes (docs/performance.md, "int8 GEMV through inductor"). Usage:

    .venv/bin/python docs/bench/int8_gemv_inductor.py [ROWS,...] [REPS]

Each kernel runs over 8 distinct copies of the weight (more than the L3 cache, as in a decode step where
every expert weight is read once), candidates interleaved; prints min / median ms per call.
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
torch.set_grad_enabled(False)
ROWS = [int(r) for r in (sys.argv[1] if len(sys.argv) > 1 else "1,4,16,64").split(",")]
REPS = int(sys.argv[2]) if len(sys.argv) > 2 else 8
COPIES = 8
SHAPES = {"w1|w3 [7168, 1024]": (7168, 1024), "w2 [1024, 3584]": (1024, 3584)}


def gemv_int8(xt: torch.Tensor, q32: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y [M, N] = x · (q · s)ᵀ for q [N, K] int8 read as int32 [N, K/4] (four codes a word, so inductor
    loads whole 32-byte vectors) and x split into its four byte planes xt [4, M, K/4]: one fused loop,
    the int8 codes read once, each byte sign-extended by two shifts."""
    acc = 0
    for j in range(4):
        b = ((q32 << (24 - 8 * j)) >> 24) if j < 3 else (q32 >> 24)
        acc = acc + xt[j][None, :, :] * b.to(xt.dtype)[:, None, :]  # [N, M, K/4]
    return (acc.sum(-1) * s[:, None]).t()


compiled = torch.compile(gemv_int8, dynamic=False)


def planes(x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], -1, 4).permute(2, 0, 1).contiguous()


for name, (N, K) in SHAPES.items():
    ws = []
    for _ in range(COPIES):
        w = torch.randn(N, K) * 0.02
        s = w.abs().amax(1) / 127
        q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        ws.append({"q": q, "s": s, "sb": s.bfloat16(), "q32": q.view(torch.int32),
                   "packed": torch.ops.mkldnn._reorder_linear_weight(w, 16)})
    for rows in ROWS:
        x = torch.randn(rows, K)
        xp = F.pad(x, (0, 0, 0, (1 << max(rows - 1, 0).bit_length()) - rows))  # moray's row bucket
        kernels = {
            "fp32 oneDNN": lambda d, x, xp: torch.ops.mkldnn._linear_pointwise(
                xp, d["packed"], None, "none", [], ""),
            "int8-bf16": lambda d, x, xp: torch.ops.aten._weight_int8pack_mm(
                x.bfloat16(), d["q"], d["sb"]).float(),
            "int8-dequant": lambda d, x, xp: F.linear(x, d["q"].to(x.dtype)) * d["s"],
            "inductor GEMV": lambda d, x, xp: compiled(planes(x), d["q32"], d["s"]),
        }
        t = time.perf_counter()
        want = F.linear(x, ws[0]["q"].float()) * ws[0]["s"]
        err = (kernels["inductor GEMV"](ws[0], x, xp) - want).abs().max()
        note = f"inductor compile {time.perf_counter() - t:.1f} s, max |err| {err:.1e}"
        times: dict[str, list[float]] = {k: [] for k in kernels}
        for _ in range(REPS):
            for k, f in kernels.items():
                for d in ws:
                    t = time.perf_counter()
                    f(d, x, xp)
                    times[k].append(time.perf_counter() - t)
        figures = ", ".join(f"{k} {min(v) * 1e3:.3f}/{statistics.median(v) * 1e3:.3f}"
                            for k, v in times.items())
        print(f"{name} {rows} rows: {figures}; {note}", flush=True)
