"""Kernel names and which combinations of kernel options serve, without torch: `moray serve` checks a
config before it loads torch. kernels.py (float and int8 kernels) and fp8.py (FP8) compute them.
"""

from __future__ import annotations

FLOAT_KERNELS = ("onednn", "dense")  # oneDNN-packed (fp32; bf16 where the CPU has bf16), `F.linear`
INT8_KERNELS = ("int8", "int8-bf16", "int8-dequant")
FP8_KERNELS = ("fp8", "fp8-dequant")  # W8A8 `torch._scaled_mm`, weight-only
KERNELS = FLOAT_KERNELS + INT8_KERNELS + FP8_KERNELS

# the kernels that compute each kind of weight: float (None), int8, fp8
KERNELS_OF: dict[str | None, tuple[str, ...]] = {
    None: FLOAT_KERNELS, "int8": INT8_KERNELS, "fp8": FP8_KERNELS}


def held_as(quantization: str | None, quantize_attention: bool, attention: bool = False) -> str | None:
    """What the experts' (`attention`: the attention side's) weights are held as: "int8", "fp8", None."""
    return quantization if not attention or quantize_attention else None


def check_options(quantization: str | None, quantize_attention: bool, force: str | None) -> None:
    """Raise ValueError unless some weights of this setting are computed by `force` (`KernelOptions`)."""
    if quantization not in KERNELS_OF:
        raise ValueError(f"unknown quantization {quantization!r} (int8, fp8 or none)")
    if quantize_attention and quantization is None:
        raise ValueError("quantize_attention needs quantization int8 or fp8")
    kinds = {held_as(quantization, quantize_attention), held_as(quantization, quantize_attention, True)}
    if force is not None and not any(force in KERNELS_OF[kind] for kind in kinds):
        raise ValueError(f"kernel {force!r} computes none of the weights of this setting")
