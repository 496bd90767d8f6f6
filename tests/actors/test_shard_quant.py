"""An int8 expert shard (`--quantization int8`), in process: it quantizes only the experts it holds, and
those it gains on re-placement; its own report (`info()`) gives its resident expert bytes. An FP8 one
(`--quantization fp8`) keeps an FP8 checkpoint's experts as stored, those it gains too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from moray.actors.experts import ExpertShard
from moray.model.config import MixtralConfig
from moray.model.experts import reference_moe
from moray.model.fp8 import Fp8Linear
from moray.model.kernels import Int8Linear, KernelOptions
from moray.model.weights import load_experts


def test_int8_shard_holds_a_quarter_of_the_bytes_and_quantizes_what_it_gains(tiny_dir: Path,
                                                                              tmp_path: Path) -> None:
    cfg = MixtralConfig.load(tiny_dir)
    held = {0: [0, 1], 1: [0]}
    fp32 = ExpertShard(str(tiny_dir), 0, held)
    int8 = ExpertShard(str(tiny_dir), 0, held, kernels=KernelOptions("int8"))
    fp32_bytes, int8_bytes = fp32.info()["param_bytes"], int8.info()["param_bytes"]
    assert fp32_bytes == 3 * cfg.expert_bytes(4)
    assert isinstance(int8_bytes, int) and int8_bytes <= 0.27 * fp32_bytes
    assert int8.info()["quantization"] == "int8"

    int8.hold({0: [1, 3], 1: [2]}, "2")  # re-placed online: experts 3 and (1, 2) are gained
    assert all(isinstance(w, Int8Linear) for bank in int8.banks.values() for w in (*bank.w13, *bank.w2))
    assert int8.info()["param_bytes"] == int8_bytes  # three experts again, all int8

    x = torch.randn(6, cfg.dim, generator=torch.Generator().manual_seed(0))
    ids, gates = torch.tensor([[1, 3]] * 6), torch.tensor([[0.6, 0.4]] * 6)
    weights = load_experts(tiny_dir, {0: [1, 3]}).tensors
    expected = reference_moe(x, ids, gates, weights, 0, cfg.n_experts)
    got = int8.serve(0, x, ids, gates)
    assert got.dtype == torch.float32  # activations stay in the serving dtype
    rel = ((got - expected).norm() / expected.norm()).item()
    assert 0 < rel < 0.02  # int8 weights: close to fp32, not equal


def test_fp8_shard_keeps_the_checkpoint_fp8_and_what_it_gains(tiny_dir: Path,
                                                              make_fp8: Callable[..., Path]) -> None:
    fp8_dir = make_fp8(tiny_dir, "channel")
    held = {0: [0, 1], 1: [0]}
    fp32_bytes = ExpertShard(str(tiny_dir), 0, held).info()["param_bytes"]
    fp8 = ExpertShard(str(fp8_dir), 0, held, kernels=KernelOptions("fp8"))
    fp8_bytes = fp8.info()["param_bytes"]
    assert isinstance(fp8_bytes, int) and isinstance(fp32_bytes, int) and fp8_bytes <= 0.27 * fp32_bytes
    assert fp8.info()["quantization"] == "fp8"

    fp8.hold({0: [1, 3], 1: [2]}, "2")  # re-placed online: experts 3 and (1, 2) are gained
    assert all(isinstance(w, Fp8Linear) for bank in fp8.banks.values() for w in (*bank.w13, *bank.w2))
    assert fp8.info()["param_bytes"] == fp8_bytes  # three experts again, all FP8
    cfg = MixtralConfig.load(fp8_dir)
    x = torch.randn(6, cfg.dim, generator=torch.Generator().manual_seed(0))
    ids, gates = torch.tensor([[1, 3]] * 6), torch.tensor([[0.6, 0.4]] * 6)
    dequantized = load_experts(fp8_dir, {0: [1, 3]}).tensors  # the stored weights, dequantized
    expected = reference_moe(x, ids, gates, dequantized, 0, cfg.n_experts)
    got = fp8.serve(0, x, ids, gates)  # CPU's default kernel: weight-only, the dequantized weights' numbers
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5
