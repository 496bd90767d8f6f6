"""Weight-only int8 (`--quantization int8`) against fp32, teacher-forced through the model's own forward:
the next token fp32 picks agrees at >= 97 % of 512 positions, and its logprob moves <= 0.05 on average."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moray.model.config import MixtralConfig
from moray.model.kernels import KernelOptions

POSITIONS = 512


@pytest.fixture(scope="module", params=["tiny", "hidden-size"])
def ckpt(request: pytest.FixtureRequest) -> tuple[Path, int]:
    """The tiny default, and one at the small preset's hidden sizes (conftest's `hidden_size_dir`): int8's
    error grows with K."""
    path: Path = request.getfixturevalue(f"{request.param.replace('-', '_')}_dir")
    return path, MixtralConfig.load(path).vocab_size


def agreement_and_delta(fp32: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Share of positions where `other` picks fp32's next token; mean |Δ logprob| of fp32's token."""
    choice = fp32.argmax(dim=-1, keepdim=True)  # [n, 1]
    agree = (other.argmax(dim=-1, keepdim=True) == choice).float().mean().item()
    return agree, (other.gather(1, choice) - fp32.gather(1, choice)).abs().mean().item()


# The tiny model's random logits are nearly flat (fp32's top token has p ~ 0.1 %; the gap to the second is
# 0.14 nats at the median, < 0.012 at 5 % of the positions), so int8's mean logprob change of ~0.007 flips
# a few positions; a few others move far more than the mean (up to 0.29 nats; gaps of 0.1-0.2 flipped),
# as a changed top-2 at a router's near-tie would.
# Measured on the tiny model as it is (vocab 32768): 506/512 = 98.8 %; with the scale torchao and gpt-fast
# use (amax / 127.5, codes -128..127) 497/512 = 97.1 % (another draw of the same rounding noise, not a
# worse recipe); on the tiny model as it was before its vocab grew to 32768 (other random weights): 496/512.
# At the hidden size, every kernel agrees >= 98 %.
LEAST_AGREEMENT = 0.97


def test_int8_agrees_with_fp32_teacher_forced(
    ckpt: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest,
    teacher_forced_local: Callable[..., torch.Tensor],
) -> None:
    """The experts int8 (the kernels the probe picks; each kernel's arithmetic: test_kernels.py), and at the
    hidden size the attention side and lm_head too (the tiny model's random 32000 x 128 lm_head is int8's
    worst case: 92 % measured)."""
    path, vocab = ckpt
    cache = tmp_path_factory.getbasetemp() / "kernel-cache"
    tokens = torch.randint(3, vocab, (POSITIONS,), generator=torch.Generator().manual_seed(1)).tolist()
    fp32 = teacher_forced_local(path, tokens, KernelOptions(), cache)
    name = request.node.callspec.id
    settings = [KernelOptions(quantization="int8")]
    if name != "tiny":  # with fp32 activations: the bf16-activation kernel gives 96.7 % here (measured)
        settings.append(KernelOptions(quantization="int8", quantize_attention=True, force="int8-dequant"))
    for options in settings:
        agree, delta = agreement_and_delta(fp32, teacher_forced_local(path, tokens, options, cache))
        assert agree >= LEAST_AGREEMENT, f"{options}: int8 picks fp32's token at {agree:.1%} of {POSITIONS}"
        assert 0 < delta <= 0.05, f"{options}: mean |Δ logprob| of fp32's token: {delta:.4f}"
