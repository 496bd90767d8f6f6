"""Weight-only int8 (`--quantization int8`) against fp32, teacher-forced through the model's own forward:
the next token fp32 picks agrees at >= 97 % of 512 positions, and its logprob moves <= 0.05 on average.

Int8 experts alone are scored through the server, on the tiny model and at the hidden size
(tests/e2e/test_quant_served.py); here, in process, what the server test does not serve: the attention side
and lm_head int8 too (`--quantize-attention`). FP8 experts quantized at load (`--quantization fp8`), each
kernel, against fp32 (bounds measured: FP8_LEAST_AGREEMENT)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from moray.model.config import MixtralConfig
from moray.model.kernels import KernelOptions
from moray.model.options import FP8_KERNELS

POSITIONS = 512
# Measured here (docs/performance.md, issue 23), int8 experts: the tiny model 506/512 = 98.8 % (mean |Δ|
# 0.0074), the hidden size 98.2-98.4 % with every int8 kernel. On a random model which positions flip is a
# draw of the rounding noise: fp32's top-2 gap is under 0.012 nats at 5 % of the positions, int8's mean
# change ~0.007, and a few positions move up to 0.29 (as a router's changed top-2 would). torchao's scale
# (amax / 127.5, codes -128..127) draws 97.1 % on the tiny model, 98.8 % at the hidden size. The tiny model's
# earlier 96.9 % (496/512) was its weights before the vocabulary grew to 32768: TinySpec(vocab=32000) gives
# 496. Experts + attention + lm_head at the hidden size: 98.0 % with fp32 inputs, 96.7 % with the
# bf16-input kernel; the tiny model's random lm_head ([V, 128]) is int8's worst case (92 % measured on its
# 32000-token weights).
LEAST_AGREEMENT = 0.97


def agreement_and_delta(fp32: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Share of positions where `other` picks fp32's next token; mean |Δ logprob| of fp32's token."""
    choice = fp32.argmax(dim=-1, keepdim=True)  # [n, 1]
    agree = (other.argmax(dim=-1, keepdim=True) == choice).float().mean().item()
    return agree, (other.gather(1, choice) - fp32.gather(1, choice)).abs().mean().item()


def test_int8_attention_and_experts_agree_with_fp32_teacher_forced(
    hidden_size_dir: Path, tmp_path: Path, teacher_forced_local: Callable[..., torch.Tensor],
) -> None:
    """At the hidden size, with fp32 inputs (`int8-dequant`; each kernel's arithmetic: test_kernels.py)."""
    vocab = MixtralConfig.load(hidden_size_dir).vocab_size
    tokens = torch.randint(3, vocab, (POSITIONS,), generator=torch.Generator().manual_seed(1)).tolist()
    fp32 = teacher_forced_local(hidden_size_dir, tokens, KernelOptions(), tmp_path)
    options = KernelOptions(quantization="int8", quantize_attention=True, force="int8-dequant")
    agree, delta = agreement_and_delta(fp32, teacher_forced_local(hidden_size_dir, tokens, options, tmp_path))
    assert agree >= LEAST_AGREEMENT, f"int8 picks fp32's token at {agree:.1%} of {POSITIONS} positions"
    assert 0 < delta <= 0.05, f"mean |Δ logprob| of fp32's token: {delta:.4f}"


# FP8 quantized at load from fp32 (`--quantization fp8`), experts, measured here over 512 positions: on the
# tiny model W8A8 (`fp8`) picks fp32's token at 89.3 % (mean |Δ| 0.047), weight-only (`fp8-dequant`) at
# 90.2 % (0.036); at the hidden size 94.1 % (0.028) and 95.3 % (0.019), not tested here: FP8's kernels
# on CPU make that test 100 s. FP8 weights carry 3 mantissa bits (relative rounding up to 1/16) where
# per-channel int8 carries ~7 for a row's large values, so FP8 moves a random model's near-ties more than
# int8 does. Against an FP8 checkpoint's own dequantized weights, weight-only is exact
# (tests/model/test_fp8.py).
FP8_LEAST_AGREEMENT = 0.87
FP8_MOST_DELTA = 0.06


def test_fp8_experts_agree_with_fp32_teacher_forced(
    tiny_dir: Path, tmp_path: Path, teacher_forced_local: Callable[..., torch.Tensor],
) -> None:
    vocab = MixtralConfig.load(tiny_dir).vocab_size
    tokens = torch.randint(3, vocab, (POSITIONS,), generator=torch.Generator().manual_seed(2)).tolist()
    fp32 = teacher_forced_local(tiny_dir, tokens, KernelOptions(), tmp_path)
    for kernel in FP8_KERNELS:
        fp8 = teacher_forced_local(tiny_dir, tokens, KernelOptions("fp8", force=kernel), tmp_path)
        agree, delta = agreement_and_delta(fp32, fp8)
        assert agree >= FP8_LEAST_AGREEMENT, f"{kernel} picks fp32's token at {agree:.1%} of {POSITIONS}"
        assert 0 < delta <= FP8_MOST_DELTA, f"{kernel}: mean |Δ logprob| of fp32's token: {delta:.4f}"
