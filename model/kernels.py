"""Linear kernels chosen by measurement: a short probe at load, per weight shape and row bucket, cached
per machine.

Which kernel is fastest for `y = x · wᵀ` depends on the CPU, the weight's shape and the rows of a call:
measured per matmul, oneDNN's packed fp32 beats MKL's `F.linear` from 4 rows on an AVX2 EPYC but not at
1 row on an AMX Xeon, and int8 weight-only (`aten._weight_int8pack_mm`) wins decode there but loses at
16 rows (issues 21, 23). So `Kernels.pack` times the candidates for the weight's dtype on this machine
(`candidates`) at the row buckets `PROBE_ROWS` and keeps the fastest; the choice is cached in a small
JSON file keyed by the CPU (model and flags), torch's version and the thread count.

A weight is held in one layout (two would double the memory of the experts), so where candidates need
different layouts (oneDNN's blocked fp32 vs a plain tensor) the layout is chosen per shape by the least
slowdown against each bucket's best, summed over the buckets; kernels that share a layout (the int8
ones) are chosen per bucket.

Shape letters: M rows of a call, N output features, K input features.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeAlias

import torch
import torch.nn.functional as F

from moray.model.fp8 import (
    FP8,
    Fp8Linear,
    channel_scales,
    default_fp8_kernel,
    fp8_native,
    quantize_fp8,
)
from moray.model.options import INT8_KERNELS, KERNELS_OF, check_options, held_as

log = logging.getLogger(__name__)

PROBE_ROWS = (1, 4, 16, 64)  # the row buckets timed: decode (1..16 in flight) to small prefill chunks
MIN_PROBE_BYTES = 1 << 20  # smaller weights take the default kernel: their µs timings would be noise
GIVE_UP = 4.0  # a probed kernel this many times slower than the best is timed once only
PACK_BATCH = 16  # the row count oneDNN's weight layout is chosen for (fast from 1 to ~64 rows)


@dataclass(eq=False)
class Int8Linear:
    """A weight-only int8 linear: `q` [N, K] int8 with per-output-channel symmetric scales [N]
    (w ≈ q · scale), computed by the kernel chosen for each row bucket (`by_rows`, ascending)."""

    q: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N] in the activations' dtype
    by_rows: tuple[tuple[int, str], ...]  # (largest rows, kernel) per probed bucket
    scales_bf16: torch.Tensor = field(init=False)  # [N] bf16, for the bf16-activation kernel
    is_mkldnn = False

    def __post_init__(self) -> None:
        self.scales_bf16 = self.scales.to(torch.bfloat16)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scales, self.scales_bf16))

    def kernel_for(self, rows: int) -> str:
        return next((k for most, k in self.by_rows if rows <= most), self.by_rows[-1][1])

    def __call__(self, x: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        """x [M, K] -> [M, N] in x's dtype."""
        kernel = kernel or self.kernel_for(x.shape[0])
        if kernel == "int8":
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.q, self.scales)
        if kernel == "int8-bf16":
            xb = x.to(torch.bfloat16).contiguous()
            return torch.ops.aten._weight_int8pack_mm(xb, self.q, self.scales_bf16).to(x.dtype)
        return F.linear(x, self.q.to(x.dtype)) * self.scales  # int8-dequant: one cast, then GEMM


LinearWeight: TypeAlias = torch.Tensor | Int8Linear | Fp8Linear  # noqa: UP040 - explicit: mypy types moray.* imports as Any


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: q [N, K] int8 and scales [N] (fp32) with w ≈ q · scales."""
    scales = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [N]
    q = torch.round(w.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def weight_bytes(w: LinearWeight) -> int:
    """Resident bytes of a packed weight (oneDNN's blocked layout: the plain tensor's size)."""
    return w.nbytes() if isinstance(w, (Int8Linear, Fp8Linear)) else w.numel() * w.element_size()


@dataclass(frozen=True)
class Choice:
    """The probe's verdict for one (kind, dtype, shape): the layout and, per row bucket, the kernel."""

    layout: str  # "onednn" | "dense" | "int8" | "fp8"
    by_rows: tuple[tuple[int, str], ...]
    ms: dict[str, dict[str, float]]  # rows -> kernel -> best time (ms); {} when forced or not probed

    def to_json(self) -> dict[str, object]:
        return {"layout": self.layout, "by_rows": [list(p) for p in self.by_rows], "ms": self.ms}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Choice:
        by_rows = tuple((int(r), str(k)) for r, k in d["by_rows"])  # type: ignore[attr-defined]
        return cls(str(d["layout"]), by_rows, dict(d["ms"]))  # type: ignore[call-overload]


class Kernels:
    """Packs the linear weights of one process for the kernels chosen on this machine.

    `quantize`: hold the weights as weight-only int8 (`Int8Linear`); `fp8`: as FP8 (`Fp8Linear`,
    fp8.py: its kernel is a per-device default, never probed: the two differ in numerics). `force`: one
    kernel for every weight and row count (tests, A/B runs); it must suit the weights (a float kernel for
    float weights, an int8 one with `quantize`, an fp8 one with `fp8`). `probe=False`: no timing, the
    default kernel (oneDNN-packed for fp32 where it exists): the deterministic mode keeps its kernels.
    `cache_dir`: where the machine's choices are kept (default $XDG_CACHE_HOME/moray, else
    ~/.cache/moray).
    """

    def __init__(self, *, quantize: bool = False, force: str | None = None, probe: bool = True,
                 cache_dir: str | Path | None = None, fp8: bool = False) -> None:
        self.quantize, self.fp8 = quantize and not fp8, fp8
        allowed = KERNELS_OF[self.quantization]
        if force is not None and force not in allowed:
            raise ValueError(f"kernel {force!r} does not compute {self.quantization or 'float'} weights; "
                             f"choose one of {', '.join(allowed)}")
        self.force, self.probe = force, probe
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.choices: dict[str, Choice] = {}  # this process's choices, by `_key`

    @property
    def quantization(self) -> str | None:
        """What the weights are held as: "int8", "fp8" or None (the serving dtype)."""
        return "fp8" if self.fp8 else "int8" if self.quantize else None

    def pack(self, w: torch.Tensor, scales: torch.Tensor | None = None) -> LinearWeight:
        """`w` [N, K] in the layout of its chosen kernel (`linear` computes with it). An FP8 `w` (kept as a
        checkpoint stores it) comes with its `scales` (per tensor or per output channel)."""
        if self.fp8:
            return self._fp8(w, scales)
        if w.dtype == FP8:
            raise ValueError("an FP8 weight is held only with quantization fp8")
        if w.dim() != 2 or w.device.type != "cpu":
            return w if not self.quantize or w.dim() != 2 else self._int8(w, _default_int8(w.device))
        choice = self.choose(w)
        if choice.layout == "int8":
            return self._int8(w, choice.by_rows)
        return _onednn_pack(w) if choice.layout == "onednn" else w

    def _int8(self, w: torch.Tensor, by_rows: tuple[tuple[int, str], ...]) -> Int8Linear:
        q, scales = quantize_int8(w)
        return Int8Linear(q, scales.to(w.dtype), by_rows)

    def _fp8(self, w: torch.Tensor, scales: torch.Tensor | None) -> Fp8Linear:
        if w.dtype == FP8:
            if scales is None:
                raise ValueError("an FP8 weight needs its scales")
            q, scales = w, channel_scales(scales, w.shape[0])
        else:
            q, scales = quantize_fp8(w)
        kernel = self.force or default_fp8_kernel(q)
        key = f"fp8:{q.shape[0]}x{q.shape[1]}"
        self.choices.setdefault(key, Choice("fp8", ((PROBE_ROWS[-1], kernel),), {}))
        return Fp8Linear(q, scales, kernel)

    def choose(self, w: torch.Tensor) -> Choice:
        key = _key(self.quantize, w)
        if key not in self.choices:
            self.choices[key] = self._decide(key, w)
        return self.choices[key]

    def _decide(self, key: str, w: torch.Tensor) -> Choice:
        options = candidates(self.quantize, w.dtype)
        if self.force is not None:
            if self.force not in options:
                raise ValueError(f"kernel {self.force!r} cannot compute {key} here (this machine has "
                                 f"{', '.join(options)})")
            return Choice(_layout(self.force), ((PROBE_ROWS[-1], self.force),), {})
        if not self.probe or len(options) == 1 or w.numel() * w.element_size() < MIN_PROBE_BYTES:
            first = options[0]
            return Choice(_layout(first), ((PROBE_ROWS[-1], first),), {})
        cache = ChoiceCache(self.cache_dir or default_cache_dir())
        cached = cache.get(key)
        if cached is not None:
            return cached
        t = time.perf_counter()
        choice = _fastest(probe(w, options))
        log.info("kernel probe %s: %s in %.2f s", key, _describe(choice), time.perf_counter() - t)
        cache.put(key, choice)
        return choice

    def report(self) -> dict[str, dict[str, object]]:
        """Per probed (kind, dtype, shape): the layout, the kernel per row bucket and the times (ms)."""
        return {key: c.to_json() for key, c in sorted(self.choices.items())}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moray"


class ChoiceCache:
    """The probe's choices for this machine: `kernels-<machine>.json` in `directory`, where <machine>
    hashes the CPU model and flags, torch's version and the thread count (any change re-probes)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"kernels-{machine_key()}.json"

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> Choice | None:
        entry = self._read().get(key)
        try:
            return Choice.from_json(entry) if entry else None
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: str, choice: Choice) -> None:
        """Merge `choice` in and replace the file atomically (a racing process at worst re-probes)."""
        data = {**self._read(), key: choice.to_json()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot cache kernel choices in %s: %s", self.path, e)


def machine_key() -> str:
    return hashlib.sha256(json.dumps(machine()).encode()).hexdigest()[:16]


def machine() -> dict[str, object]:
    """What the choice depends on: the CPU (model name and ISA flags), torch, the threads it uses."""
    cpu, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and not cpu.strip():
                cpu = value.strip()
            if name.strip() == "flags":
                flags = " ".join(sorted(value.split()))
                break
    except OSError:
        pass
    return {"cpu": cpu, "flags": hashlib.sha256(flags.encode()).hexdigest()[:12],
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def probe(w: torch.Tensor, kernels: tuple[str, ...], reps: int = 5) -> dict[str, dict[str, float]]:
    """Best time (ms) of each candidate kernel for `w` at each of `PROBE_ROWS` rows (random inputs). A
    kernel whose first timed call is over `GIVE_UP` x the best so far is not timed further (the int8
    kernel with fp32 inputs takes seconds at 64 rows of an expert without AVX-512)."""
    runs = {k: _runner(k, w) for k in kernels}
    g = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    for rows in PROBE_ROWS:
        x = torch.randn(rows, w.shape[1], generator=g).to(w.dtype)
        times: dict[str, float] = {}
        for k, run in runs.items():
            call = functools.partial(run, x)
            first = _best_ms(call, 1)
            slow = bool(times) and first > GIVE_UP * min(times.values())
            times[k] = round(first if slow else min(first, _best_ms(call, reps - 1)), 4)
        out[str(rows)] = times
    return out


def _runner(kernel: str, w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    if kernel in INT8_KERNELS:
        q, scales = quantize_int8(w)
        lin = Int8Linear(q, scales.to(w.dtype), ((PROBE_ROWS[-1], kernel),))
        return lambda x: lin(x, kernel)
    packed = _onednn_pack(w) if kernel == "onednn" else w
    return lambda x: linear_dense(x, packed)


def _best_ms(fn: Callable[[], object], reps: int) -> float:
    """The fastest of `reps` timed calls (the minimum resists other load), after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _fastest(ms: dict[str, dict[str, float]]) -> Choice:
    """The layout with the least slowdown summed over the buckets (time / the bucket's best time, so a
    1-row bucket counts as much as a 64-row one); per bucket, that layout's fastest kernel."""
    kernels = list(next(iter(ms.values())))

    def slowdown(layout: str) -> float:
        return sum(min(t[k] for k in kernels if _layout(k) == layout) / max(min(t.values()), 1e-9)
                   for t in ms.values())

    layout = min(sorted({_layout(k) for k in kernels}), key=slowdown)
    mine = [k for k in kernels if _layout(k) == layout]
    by_rows = tuple((int(rows), min(mine, key=t.__getitem__)) for rows, t in ms.items())
    return Choice(layout, by_rows, ms)


def _describe(choice: Choice) -> str:
    return ", ".join(f"{rows} rows: {k}" for rows, k in choice.by_rows)


def _layout(kernel: str) -> str:
    return "int8" if kernel in INT8_KERNELS else kernel


def _key(quantize: bool, w: torch.Tensor) -> str:
    kind = "int8" if quantize else "float"
    return f"{kind}:{str(w.dtype).removeprefix('torch.')}:{w.shape[0]}x{w.shape[1]}"


def candidates(quantize: bool, dtype: torch.dtype) -> tuple[str, ...]:
    """The kernels that compute weights of `dtype` here, the default first."""
    if quantize:
        return INT8_KERNELS if dtype != torch.float16 else ("int8", "int8-dequant")
    return ("onednn", "dense") if onednn_packs(dtype) else ("dense",)


def _default_int8(device: torch.device) -> tuple[tuple[int, str], ...]:
    """Off CPU (or for odd weights) no probe: int8 weight-only through a dequantizing GEMM."""
    return ((PROBE_ROWS[-1], "int8-dequant"),)


def linear_dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] · wᵀ for a plain or oneDNN-packed `w`; packed: rows padded to `row_bucket` (oneDNN
    caches a kernel per input shape, each with its own buffers: fed every row count a server sees, one
    expert weight's cache grew by ~700 MB, measured)."""
    if not w.is_mkldnn:
        return F.linear(x, w)
    rows = x.shape[0]
    padded = row_bucket(rows)
    if padded != rows:
        x = F.pad(x, (0, 0, 0, padded - rows))
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")[:rows]


def row_bucket(rows: int) -> int:
    """The row count a packed weight computes `rows` rows with: the next power of two up to 64, then the
    next multiple of 64 (at most 2x the work at 33-64 rows, where the weight read dominates anyway)."""
    if rows <= 64:
        return 1 << max(rows - 1, 0).bit_length()
    return -(-rows // 64) * 64


def _onednn_pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_BATCH)


_ONEDNN: dict[torch.dtype, bool] = {}


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU have oneDNN's packed linear for `dtype` (private ops: fp32 wherever
    oneDNN is built in; bf16 only with bf16 instructions, AVX512-BF16/AMX or AVX-NE-CONVERT). Checked
    once per dtype on a tiny case against `F.linear`."""
    if dtype not in _ONEDNN:
        try:
            w, x = torch.randn(24, 16).to(dtype), torch.randn(3, 16).to(dtype)
            got = linear_dense(x, _onednn_pack(w))
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            _ONEDNN[dtype] = bool(torch.allclose(got.float(), F.linear(x, w).float(), rtol=tol, atol=tol))
        except (AttributeError, RuntimeError):
            _ONEDNN[dtype] = False
    return _ONEDNN[dtype]


@dataclass(frozen=True)
class KernelOptions:
    """A serving setting's kernel options (picklable: every process that holds weights gets them and
    makes its own `Kernels`). `quantization` "int8" holds the experts (and, with `quantize_attention`,
    attention and lm_head) as weight-only int8, "fp8" as FP8 (fp8.py: an FP8 checkpoint's weights as
    stored, float ones quantized at load). `force` goes to the weights it computes (a float kernel to
    float weights, an int8 one to int8 weights, an fp8 one to fp8 weights)."""

    quantization: str | None = None  # None | "int8" | "fp8"
    quantize_attention: bool = False
    force: str | None = None

    def __post_init__(self) -> None:
        check_options(self.quantization, self.quantize_attention, self.force)

    def kind(self, attention: bool = False) -> str | None:
        """What the experts' (`attention`: the attention side's) weights are held as: "int8", "fp8", None."""
        return held_as(self.quantization, self.quantize_attention, attention)

    def _fits(self, kind: str | None) -> bool:
        return self.force in KERNELS_OF[kind]

    def for_checkpoint(self, checkpoint_fp8: bool, device: str | torch.device) -> KernelOptions:
        """The options a process holding weights on `device` applies: with no quantization asked, an FP8
        checkpoint's experts stay FP8 where the device computes FP8 natively (CUDA capability >= 8.9);
        elsewhere they are dequantized at load into the serving dtype."""
        if self.quantization is None and checkpoint_fp8 and fp8_native(torch.device(device)):
            return replace(self, quantization="fp8", force=self.force if self._fits("fp8") else None)
        return self

    def kernels(self, *, attention: bool = False, deterministic: bool = False,
                cache_dir: str | Path | None = None) -> Kernels:
        """The experts' (or, `attention`, the attention side's) kernels. Deterministic mode probes
        nothing: its kernels stay the defaults (invariant.py checks what they compute)."""
        kind = self.kind(attention)
        force = self.force if self._fits(kind) else None
        return Kernels(quantize=kind == "int8", fp8=kind == "fp8", force=force, probe=not deterministic,
                       cache_dir=cache_dir)
