"""FP8 checkpoints in the compressed-tensors format, written by the `compressed-tensors` library: moray's
teacher-forced logits equal those of the same checkpoint dequantized to fp32 by hand (`weight.float() *
weight_scale`, a plain checkpoint), per-tensor and per-channel scales, in fp32 and through `--quantization
int8`; a shard reads only its experts' weights and scales."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moray.model.config import MixtralConfig
from moray.model.kernels import KernelOptions
from moray.model.weights import load_experts

POSITIONS = 256
# (scale strategy, the format config.json names): the library's own inferred one, and the one public
# FP8 checkpoints carry
CHECKPOINTS = [("tensor", "float-quantized"), ("channel", None)]


@pytest.fixture(scope="module", params=CHECKPOINTS, ids=lambda c: c[0])
def fp8_pair(request: pytest.FixtureRequest, tiny_dir: Path, make_fp8: Callable[..., Path],
             dequantize_fp8: Callable[[Path, Path], Path], tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, Path]:
    fp8 = make_fp8(tiny_dir, *request.param)
    return fp8, dequantize_fp8(fp8, tmp_path_factory.mktemp("dequantized") / "ckpt")


@pytest.mark.parametrize("options", [KernelOptions(), KernelOptions(quantization="int8")],
                         ids=["fp32", "int8"])
def test_fp8_logits_equal_the_dequantized_checkpoint(
    fp8_pair: tuple[Path, Path], options: KernelOptions, tmp_path_factory: pytest.TempPathFactory,
    teacher_forced_local: Callable[..., torch.Tensor],
) -> None:
    fp8, plain = fp8_pair
    cache = tmp_path_factory.getbasetemp() / "kernel-cache"
    vocab = MixtralConfig.load(fp8).vocab_size
    tokens = torch.randint(3, vocab, (POSITIONS,), generator=torch.Generator().manual_seed(2)).tolist()
    got = teacher_forced_local(fp8, tokens, options, cache)
    want = teacher_forced_local(plain, tokens, options, cache)
    assert (got - want).abs().max().item() <= 1e-4


def test_a_shard_reads_only_its_experts_fp8_weights_and_scales(fp8_pair: tuple[Path, Path]) -> None:
    fp8, plain = fp8_pair
    got = load_experts(fp8, {1: [2, 5]})
    names = {f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight{s}"
             for e in (2, 5) for w in ("w1", "w2", "w3") for s in ("", "_scale")}
    assert got.loaded == names
    want = load_experts(plain, {1: [2, 5]}).tensors
    assert got.tensors.keys() == want.keys()
    for name, t in got.tensors.items():
        assert t.dtype == torch.float32 and torch.equal(t, want[name]), name
