"""FP8 checkpoints in the compressed-tensors format, written by the `compressed-tensors` library: moray's
teacher-forced logits equal those of the same checkpoint dequantized to fp32 by hand (`weight.float() *
weight_scale`, a plain checkpoint), per-tensor and per-channel scales, in fp32 and through `--quantization
int8`; a shard reads only its experts' weights and scales.

`--quantization fp8` keeps them FP8: the resident weights are the stored bytes, the weight-only kernel's
logits equal the dequantized checkpoint's, W8A8's agree with them; a float checkpoint quantized at load
is what the library writes, bit for bit; deterministic mode holds with FP8 weights."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moray.model.config import MixtralConfig
from moray.model.fp8 import Fp8Linear
from moray.model.kernels import KernelOptions, LinearWeight
from moray.model.kv_cache import KVCache
from moray.model.layers import StepBatch
from moray.model.mixtral import load_local
from moray.model.options import FP8_KERNELS
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


def tokens_of(ckpt: Path, n: int, seed: int = 2) -> list[int]:
    vocab = MixtralConfig.load(ckpt).vocab_size
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# Measured here (tiny model, 256 positions; docs/performance.md, issue 23): fp8-dequant's max |Δ logprob| vs
# the dequantized fp32 checkpoint 3.8e-6, the same token everywhere. fp8 (W8A8) adds the activations' FP8
# rounding (3 mantissa bits, ~2.5 % per matmul): the same token at 92.6 % (per-tensor scales) and 88.3 %
# (per-channel) of the positions, mean |Δ| of the dequantized model's choice 0.027 / 0.042. The tiny random
# model's top-2 gaps are small (int8 weight-only agrees with fp32 at 97 %, FP8 weight-only quantized from
# fp32 at 89 %): these bounds say W8A8 stays close, not that it is lossless.
W8A8_LEAST_AGREEMENT = 0.85
W8A8_MOST_DELTA = 0.05
@pytest.mark.parametrize("kernel", FP8_KERNELS)
def test_fp8_kept_logits_against_the_dequantized_checkpoint(
    fp8_pair: tuple[Path, Path], kernel: str, tmp_path_factory: pytest.TempPathFactory,
    teacher_forced_local: Callable[..., torch.Tensor],
) -> None:
    fp8, plain = fp8_pair
    cache = tmp_path_factory.getbasetemp() / "kernel-cache"
    tokens = tokens_of(fp8, POSITIONS)
    got = teacher_forced_local(fp8, tokens, KernelOptions("fp8", force=kernel), cache)
    want = teacher_forced_local(plain, tokens, KernelOptions(), cache)
    if kernel == "fp8-dequant":  # weight-only: the dequantized weights' arithmetic, summed in another order
        assert (got - want).abs().max().item() <= 1e-4
        return
    choice = want.argmax(dim=-1, keepdim=True)  # [n, 1]
    agree = (got.argmax(dim=-1, keepdim=True) == choice).float().mean().item()
    delta = (got.gather(1, choice) - want.gather(1, choice)).abs().mean().item()
    assert agree >= W8A8_LEAST_AGREEMENT, f"W8A8 picks the dequantized model's token at {agree:.1%}"
    assert 0 < delta <= W8A8_MOST_DELTA, f"mean |Δ logprob| of the dequantized model's choice: {delta:.4f}"


def stored_linears(ckpt: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The checkpoint's FP8 weights as the library wrote them: HF name -> (bytes [N, K] uint8, scales [N])."""
    state = load_file(ckpt / "model.safetensors")
    return {n: (t.view(torch.uint8), state[n + "_scale"].float().reshape(-1).expand(t.shape[0]))
            for n, t in state.items() if n + "_scale" in state}


def assert_holds(w: LinearWeight, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """`w` is FP8 and holds exactly the stored `parts` (weights and scales) stacked by rows."""
    assert isinstance(w, Fp8Linear)
    assert torch.equal(w.q.view(torch.uint8), torch.cat([q for q, _ in parts]))
    assert torch.equal(w.scales, torch.cat([s for _, s in parts]))


def test_an_fp8_checkpoint_is_kept_as_stored(fp8_pair: tuple[Path, Path]) -> None:
    fp8, _ = fp8_pair
    cfg, stored = MixtralConfig.load(fp8), stored_linears(fp8)
    options = KernelOptions("fp8", quantize_attention=True)
    model, experts = load_local(fp8, kernels=options.kernels(),
                                attention_kernels=options.kernels(attention=True))
    for layer, bank in experts.banks.items():
        for i, e in enumerate(bank.expert_ids):
            name = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{{}}.weight"
            assert_holds(bank.w13[i], [stored[name.format("w1")], stored[name.format("w3")]])
            assert_holds(bank.w2[i], [stored[name.format("w2")]])
        attn = f"model.layers.{layer}.self_attn.{{}}_proj.weight"
        assert_holds(model.lin(f"layers.{layer}.wqkv"), [stored[attn.format(p)] for p in "qkv"])
        assert_holds(model.lin(f"layers.{layer}.wo"), [stored[attn.format("o")]])
    assert isinstance(model.lin("lm_head"), Fp8Linear)  # stored in bf16/fp32 (`ignore`): quantized at load
    fp32_bytes = cfg.n_layers * cfg.n_experts * cfg.expert_bytes(4)
    resident = sum(bank.param_bytes() for bank in experts.banks.values())
    assert resident == fp32_bytes // 4 + cfg.n_layers * cfg.n_experts * 4 * (2 * cfg.hidden_dim + cfg.dim)
    assert resident <= 0.27 * fp32_bytes


def test_a_float_checkpoint_is_quantized_at_load_as_the_library_does(
    tiny_dir: Path, make_fp8: Callable[..., Path]
) -> None:
    """Per output channel, amax / 448: the bytes and scales compressed-tensors writes for the same weights."""
    stored = stored_linears(make_fp8(tiny_dir, "channel"))
    _, experts = load_local(tiny_dir, kernels=KernelOptions("fp8").kernels())
    for layer, bank in experts.banks.items():
        for i, e in enumerate(bank.expert_ids):
            name = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{{}}.weight"
            assert_holds(bank.w13[i], [stored[name.format("w1")], stored[name.format("w3")]])
            assert_holds(bank.w2[i], [stored[name.format("w2")]])


def test_deterministic_fp8_prefill_chunks_give_the_same_logits(fp8_pair: tuple[Path, Path]) -> None:
    """Deterministic mode's guarantee within the FP8 setting: W8A8 quantizes each row on its own, so a
    row's logits do not depend on how the prompt was chunked."""
    fp8, _ = fp8_pair
    options = KernelOptions("fp8", quantize_attention=True, force="fp8")
    model, experts = load_local(fp8, deterministic=True, kernels=options.kernels(deterministic=True),
                                attention_kernels=options.kernels(attention=True, deterministic=True))
    tokens = tokens_of(fp8, 40, seed=3)

    def logits(chunks: list[int]) -> torch.Tensor:
        kv = KVCache(model.cfg, num_blocks=16, block_size=4, dtype=torch.float32, device="cpu")
        out, start = [], 0
        for n in chunks:
            batch = StepBatch.for_sequence(tokens[start : start + n], start, list(range(16)), 4,
                                           all_logits=True)
            out.append(asyncio.run(model.forward_step(batch, kv, experts)))
            start += n
        return torch.cat(out)

    whole = logits([40])
    assert torch.equal(logits([7] * 5 + [5]), whole)
    assert torch.equal(logits([1] * 40), whole)
