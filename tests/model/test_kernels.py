"""Linear kernels chosen by measurement (model/kernels.py): every kernel computes `F.linear`, the probe
picks one of the candidates and caches it per machine, a forced kernel is obeyed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moray.model.fp8 import FP8, Fp8Linear, quantize_fp8
from moray.model.kernels import (
    PROBE_ROWS,
    ChoiceCache,
    Int8Linear,
    KernelOptions,
    Kernels,
    candidates,
    default_cache_dir,
    quantize_int8,
)
from moray.model.layers import linear, pack_linear
from moray.model.options import FP8_KERNELS, INT8_KERNELS, KERNELS

ROWS = (0, 1, 3, 16, 17, 64, 65, 130)


def weight(n: int = 96, k: int = 80, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kernel", candidates(False, torch.float32))
def test_every_float_kernel_equals_f_linear(kernel: str, tmp_path: Path) -> None:
    w = weight()
    packed = pack_linear(w, Kernels(force=kernel, cache_dir=tmp_path))
    assert packed.is_mkldnn == (kernel == "onednn")
    gen = torch.Generator().manual_seed(6)
    for rows in ROWS:
        x = torch.randn(rows, 80, generator=gen)
        torch.testing.assert_close(linear(x, packed), F.linear(x, w), rtol=1e-4, atol=1e-4)
    x3 = torch.randn(2, 5, 80, generator=gen)
    torch.testing.assert_close(linear(x3, packed), F.linear(x3, w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", INT8_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_int8_kernel_computes_the_dequantized_weight(kernel: str, dtype: torch.dtype,
                                                           tmp_path: Path) -> None:
    w = weight().to(dtype)
    packed = pack_linear(w, Kernels(quantize=True, force=kernel, cache_dir=tmp_path))
    assert isinstance(packed, Int8Linear) and packed.q.dtype == torch.int8
    dequantized = packed.q.float() * packed.scales.float()[:, None]  # [N, K]
    tol = 1e-4 if dtype == torch.float32 and kernel != "int8-bf16" else 3e-2
    gen = torch.Generator().manual_seed(7)
    for rows in ROWS:
        x = torch.randn(rows, 80, generator=gen).to(dtype)
        y = linear(x, packed)
        assert y.dtype == dtype and y.shape == (rows, 96)
        torch.testing.assert_close(y.float(), F.linear(x.float(), dequantized), rtol=tol, atol=tol * 10)


def test_int8_is_symmetric_per_output_channel() -> None:
    w = weight() * torch.linspace(0.01, 10, 96)[:, None]  # rows of very different magnitude
    q, scales = quantize_int8(w)
    assert q.abs().amax(dim=1).tolist() == [127] * 96  # each row uses the full range
    assert torch.all((w - q.float() * scales[:, None]).abs() <= scales[:, None] / 2 + 1e-6)


# Relative error (Frobenius) against the dequantized weights' fp32 linear: weight-only is exact up to fp32
# rounding (bf16 activations: their own rounding); W8A8 adds the activations' FP8 rounding (3 mantissa bits:
# ~2.5 % measured on these random rows, whatever the row count).
FP8_TOLERANCE = {("fp8-dequant", torch.float32): 1e-5, ("fp8-dequant", torch.bfloat16): 1e-2,
                 ("fp8", torch.float32): 0.05, ("fp8", torch.bfloat16): 0.05}


@pytest.mark.parametrize("kernel", FP8_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_fp8_kernel_computes_the_dequantized_weight(kernel: str, dtype: torch.dtype,
                                                          tmp_path: Path) -> None:
    w = weight().to(dtype)
    packed = pack_linear(w, Kernels(fp8=True, force=kernel, cache_dir=tmp_path))
    assert isinstance(packed, Fp8Linear) and packed.q.dtype == FP8 and packed.kernel == kernel
    dequantized = packed.q.float() * packed.scales[:, None]  # [N, K]
    gen = torch.Generator().manual_seed(7)
    errors = []
    for rows in ROWS:
        x = torch.randn(rows, 80, generator=gen).to(dtype)
        y = linear(x, packed)
        assert y.dtype == dtype and y.shape == (rows, 96)
        want = F.linear(x.float(), dequantized)
        errors += [((y.float() - want).norm() / want.norm()).item()] if rows else []
    assert max(errors) <= FP8_TOLERANCE[kernel, dtype], errors
    if kernel == "fp8":
        assert min(errors) > 1e-3  # the activations are quantized too: close, not equal


def test_fp8_is_per_output_channel_and_kept_as_given() -> None:
    w = weight() * torch.linspace(0.01, 10, 96)[:, None]  # rows of very different magnitude
    q, scales = quantize_fp8(w)
    assert q.float().abs().amax(dim=1).tolist() == [448.0] * 96  # each row uses the full range
    assert torch.all((w - q.float() * scales[:, None]).abs() <= w.abs() / 16 + scales[:, None] / 2**9)
    packed = pack_linear(q, Kernels(fp8=True), scales.amax()[None])  # an FP8 weight with a per-tensor scale
    assert isinstance(packed, Fp8Linear) and packed.q is q
    assert torch.equal(packed.scales, scales.amax().expand(96))


def test_probe_times_the_candidates_and_caches_the_choice(tmp_path: Path) -> None:
    w = weight(512, 512)  # MIN_PROBE_BYTES: smaller ones are not probed
    kernels = Kernels(cache_dir=tmp_path)
    packed = pack_linear(w, kernels)
    (key, entry), = kernels.report().items()
    assert key == "float:float32:512x512"
    assert set(entry["ms"]) == {str(r) for r in PROBE_ROWS}  # type: ignore[arg-type]
    assert all(set(t) == set(candidates(False, torch.float32)) for t in entry["ms"].values())  # type: ignore[attr-defined]
    assert packed.is_mkldnn == (entry["layout"] == "onednn")
    cache = ChoiceCache(tmp_path)
    assert json.loads(cache.path.read_text())[key] == entry

    # Another process on this machine reads the cached choice instead of probing: make the cache say
    # the layout the probe did not choose, and it is obeyed.
    other = "dense" if entry["layout"] == "onednn" else "onednn"
    doctored = {**entry, "layout": other, "by_rows": [[64, other]]}
    cache.path.write_text(json.dumps({key: doctored}))
    if other in candidates(False, torch.float32):
        assert pack_linear(w, Kernels(cache_dir=tmp_path)).is_mkldnn == (other == "onednn")


def test_int8_probe_chooses_per_row_bucket_among_int8_kernels(tmp_path: Path) -> None:
    packed = pack_linear(weight(512, 512), Kernels(quantize=True, cache_dir=tmp_path))
    assert isinstance(packed, Int8Linear)
    assert [rows for rows, _ in packed.by_rows] == list(PROBE_ROWS)
    assert {k for _, k in packed.by_rows} <= set(INT8_KERNELS)


def test_small_weights_take_the_default_kernel_unprobed(tmp_path: Path) -> None:
    kernels = Kernels(cache_dir=tmp_path)
    assert pack_linear(weight(64, 48), kernels).is_mkldnn == (candidates(False, torch.float32)[0] == "onednn")
    assert kernels.report()["float:float32:64x48"]["ms"] == {}
    assert not any(tmp_path.iterdir())  # nothing measured, nothing cached


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "moray"


def test_the_server_config_names_every_kernel() -> None:
    from typing import get_args

    from moray.deploy.serve.config import KernelName

    assert get_args(KernelName) == KERNELS


def test_kernel_options_refuse_what_they_cannot_do() -> None:
    with pytest.raises(ValueError, match="computes none"):
        KernelOptions(force="int8")
    with pytest.raises(ValueError, match="computes none"):
        KernelOptions(quantization="int8", quantize_attention=True, force="dense")
    with pytest.raises(ValueError, match="needs quantization int8"):
        KernelOptions(quantize_attention=True)
    opts = KernelOptions(quantization="int8", force="dense")  # the attention side takes it
    assert opts.kernels(attention=True).force == "dense" and opts.kernels().force is None
    fp8 = KernelOptions(quantization="fp8", quantize_attention=True, force="fp8")
    assert fp8.kernels().fp8 and fp8.kernels(attention=True).force == "fp8"
    with pytest.raises(ValueError, match="computes none"):
        KernelOptions(quantization="fp8", force="int8")
    with pytest.raises(ValueError, match="does not compute fp8"):
        Kernels(fp8=True, force="dense")
