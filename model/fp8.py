"""FP8 weights kept FP8 (`--quantization fp8`): `Fp8Linear` and per-output-channel FP8 quantization at load.

An FP8 linear holds its weight q [N, K] float8_e4m3fn and per-output-channel fp32 scales [N], w ≈ q · scale
(a checkpoint's per-tensor scale broadcast to [N] is exact): 1 byte a weight and 4 a row, ~0.25x fp32. The
weights come either as a compressed-tensors FP8 checkpoint stores them (weights.py hands them over as
stored, no dequantize/requantize round trip) or quantized at load from float weights, amax / 448 per
output channel (`quantize_fp8`, like vLLM's `--quantization fp8`, whose scale is per tensor).

Two kernels, which differ in numerics, so they are never probed against each other: which one runs is a
per-device default (`default_fp8_kernel`) or forced (`--kernel`):
- "fp8": W8A8, `torch._scaled_mm` on activations quantized to FP8 per row on the fly (a dynamic per-token
  scale, amax / 448), as vLLM computes FP8 checkpoints on Hopper and Ada. The default on CUDA with compute
  capability >= 8.9 (FP8 tensor cores). Row-local: a row's result depends only on that row.
- "fp8-dequant": weight-only, x · q.to(x.dtype)ᵀ · scales, the dequantized weights' linear up to fp32
  rounding. The default elsewhere: on CPU it is exact against the checkpoint's weights (accuracy first),
  and measured faster than `_scaled_mm`'s CPU kernel (docs/performance.md, issue 23).

Shape letters: M rows of a call, N output features, K input features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
CUDA_FP8_CAPABILITY = (8, 9)  # Ada and Hopper on: FP8 tensor cores, `torch._scaled_mm`
SCALED_MM_ALIGN = 16  # cuBLASLt's FP8 GEMM wants K and N multiples of 16


@dataclass(eq=False)
class Fp8Linear:
    """An FP8 linear: `q` [N, K] float8_e4m3fn with per-output-channel fp32 `scales` [N] (w ≈ q · scale),
    computed by `kernel` ("fp8" W8A8 or "fp8-dequant" weight-only)."""

    q: torch.Tensor  # [N, K] float8_e4m3fn
    scales: torch.Tensor  # [N] fp32
    kernel: str
    is_mkldnn = False

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scales))

    def __call__(self, x: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        """x [M, K] -> [M, N] in x's dtype."""
        if (kernel or self.kernel) == "fp8":
            return scaled_mm(x, self.q, self.scales)
        y = F.linear(x, self.q.to(x.dtype))  # [M, N]; e4m3 values are exact in fp32, bf16 and fp16
        return (y.float() * self.scales).to(x.dtype)


def scaled_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W8A8: x [M, K] quantized to FP8 per row (scale amax / 448) times qᵀ [K, N] with `scales` [N], through
    `torch._scaled_mm` (fp32 accumulation, scales applied to the output), in x's dtype."""
    if x.shape[0] == 0:  # `_scaled_mm` rejects an empty activation's scales
        return x.new_zeros(0, q.shape[0])
    xf = x.float()
    x_scales = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # [M, 1]
    xq = (xf / x_scales).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # [M, K]
    return torch._scaled_mm(xq, q.t(), scale_a=x_scales, scale_b=scales[None], out_dtype=x.dtype)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel FP8: q [N, K] float8_e4m3fn and scales [N] fp32 (amax / 448), w ≈ q · scales."""
    scales = w.float().abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX  # [N]
    q = (w.float() / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scales


def channel_scales(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A checkpoint's `weight_scale` (one per tensor or one per output channel) as fp32 [N]."""
    return scale.reshape(-1).float().expand(rows).contiguous()


def fp8_native(device: torch.device) -> bool:
    """Whether `device` computes FP8 matmuls natively (CUDA compute capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= CUDA_FP8_CAPABILITY


def default_fp8_kernel(q: torch.Tensor) -> str:
    """"fp8" (W8A8) where FP8 tensor cores compute this weight's shape, else "fp8-dequant"."""
    aligned = q.shape[0] % SCALED_MM_ALIGN == 0 and q.shape[1] % SCALED_MM_ALIGN == 0
    return "fp8" if fp8_native(q.device) and aligned else "fp8-dequant"
