"""Checkpoint loading by role, straight from safetensors, one tensor at a time.

A role names the tensors one process needs: the dispatcher loads `attention` (embeddings, norms,
attention, routers, lm_head); an expert shard loads `experts({layer: [expert ids]})`. Nothing
else is read from disk. HF (`model.layers.{i}...`, single or sharded with an index) and Mistral
consolidated (`layers.{i}...` + `params.json`) names map onto ours through one declarative table.

FP8 checkpoints in the compressed-tensors format (`quantization_config`, config.py `CheckpointQuant`):
a weight stored as float8_e4m3fn beside its `weight_scale` (per tensor or per output channel) is
dequantized once here, `weight.float() * weight_scale`, into the serving dtype (`--quantization int8`
then re-quantizes it like any float weight), or, with `keep_fp8` (`--quantization fp8`), handed over as
stored: the FP8 tensor under our name and its scale as fp32 [N] under `<name>.scale` (`SCALE`), which
`Kernels.pack` takes as they are (fp8.py). Weights without a scale (the config's `ignore`, e.g. lm_head)
are read as stored. `input_scale` (static FP8 activation scales) is not read: activations are quantized
per row on the fly (the "fp8" kernel) or not at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moray.model.config import MixtralConfig
from moray.model.fp8 import channel_scales

log = logging.getLogger(__name__)

# ours -> (HF name, Mistral consolidated name). `{i}` layer, `{e}` expert.
NAME_TABLE: dict[str, tuple[str, str]] = {
    "embed": ("model.embed_tokens.weight", "tok_embeddings.weight"),
    "norm": ("model.norm.weight", "norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
    "layers.{i}.attn_norm": ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
    "layers.{i}.wq": ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight"),
    "layers.{i}.wk": ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wk.weight"),
    "layers.{i}.wv": ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wv.weight"),
    "layers.{i}.wo": ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight"),
    "layers.{i}.ffn_norm": (
        "model.layers.{i}.post_attention_layernorm.weight",
        "layers.{i}.ffn_norm.weight",
    ),
    "layers.{i}.gate": (
        "model.layers.{i}.block_sparse_moe.gate.weight",
        "layers.{i}.feed_forward.gate.weight",
    ),
}
EXPERT_TABLE: dict[str, tuple[str, str]] = {
    w: (
        f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{w}.weight",
        f"layers.{{i}}.feed_forward.experts.{{e}}.{w}.weight",
    )
    for w in ("w1", "w2", "w3")
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing file or tensor, wrong shape, corrupt data."""


def expected_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every name template (ours), from the config."""
    D, F = cfg.dim, cfg.hidden_dim
    return {
        "embed": (cfg.vocab_size, D),
        "norm": (D,),
        "lm_head": (cfg.vocab_size, D),
        "layers.{i}.attn_norm": (D,),
        "layers.{i}.wq": (cfg.q_dim, D),
        "layers.{i}.wk": (cfg.kv_dim, D),
        "layers.{i}.wv": (cfg.kv_dim, D),
        "layers.{i}.wo": (D, cfg.q_dim),
        "layers.{i}.ffn_norm": (D,),
        "layers.{i}.gate": (cfg.n_experts, D),
        "w1": (F, D),
        "w3": (F, D),
        "w2": (D, F),
    }


class Checkpoint:
    """Index of a checkpoint directory: which file holds which tensor. Reads headers only."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        self.config = MixtralConfig.load(self.dir)
        self.file_of = self._index()
        self.consolidated = not any(n.startswith("model.") for n in self.file_of)

    def _index(self) -> dict[str, Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.dir / f for name, f in weight_map.items()}
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir} holds no *.safetensors file")
        file_of: dict[str, Path] = {}
        for f in files:
            with _open(f) as st:
                file_of.update({name: f for name in st.keys()})
        return file_of

    def checkpoint_name(self, ours: str, template: tuple[str, str]) -> str:
        return template[1 if self.consolidated else 0].format(**_fields(ours))

    def read(self, ckpt_name: str, shape: tuple[int, ...] | None) -> torch.Tensor:
        """One tensor; `shape` (None: any) is checked."""
        path = self.file_of.get(ckpt_name)
        if path is None:
            raise CheckpointError(f"tensor {ckpt_name!r} is missing from the checkpoint in {self.dir}")
        if not path.is_file():
            raise CheckpointError(f"file {path} (holding {ckpt_name!r}) does not exist")
        with _open(path) as st:
            try:
                t = st.get_tensor(ckpt_name)
            except (SafetensorError, RuntimeError) as e:
                raise CheckpointError(f"cannot read tensor {ckpt_name!r} from {path}: {e}") from None
        if shape is not None and tuple(t.shape) != shape:
            raise CheckpointError(
                f"tensor {ckpt_name!r} in {path} has shape {tuple(t.shape)}, config expects {shape}"
            )
        return t

    def read_weight(self, ckpt_name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, list[str]]:
        """A weight in a float dtype (FP8 ones dequantized to fp32) and the checkpoint names it read."""
        t, scale, names = self.read_stored(ckpt_name, shape)
        return (t if scale is None else t.float() * scale[:, None]), names

    def read_stored(self, ckpt_name: str, shape: tuple[int, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """A weight as stored, its scale as fp32 [N] if it is FP8 (None: a float weight), and the
        checkpoint names it read."""
        t = self.read(ckpt_name, shape)
        scale_name = ckpt_name.removesuffix(".weight") + ".weight_scale"
        quant = self.config.checkpoint_quant
        if quant is None or scale_name not in self.file_of:
            if t.dtype in FP8_DTYPES:
                raise CheckpointError(f"tensor {ckpt_name!r} is FP8 but the checkpoint has no "
                                      f"{scale_name!r} (or no compressed-tensors quantization_config)")
            return t, None, [ckpt_name]
        scale = self.read(scale_name, None)
        if t.dtype not in FP8_DTYPES or scale.numel() not in quant.scale_sizes(shape[0]):
            raise CheckpointError(
                f"tensor {ckpt_name!r} ({t.dtype}) with scale of shape {tuple(scale.shape)} is not an FP8 "
                f"weight with per-{'/'.join(sorted(quant.strategies))} scales as quantization_config says"
            )
        return t, channel_scales(scale, shape[0]), [ckpt_name, scale_name]


FP8_DTYPES = (torch.float8_e4m3fn,)
SCALE = ".scale"  # our name of an FP8 weight's scales: `<weight>.scale`
# the weights `keep_fp8` keeps FP8 (those computed through `layers.linear`); an FP8 router is dequantized
FP8_KEPT = (".wq", ".wk", ".wv", ".wo", "lm_head", ".w1", ".w2", ".w3")


@dataclass(frozen=True)
class LoadedWeights:
    tensors: dict[str, torch.Tensor]  # our names -> tensors
    loaded: frozenset[str]  # checkpoint names read from disk

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def load_attention(
    model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    keep_fp8: bool = False,
) -> LoadedWeights:
    """Everything but the experts: embeddings, norms, attention, routers, lm_head. `keep_fp8`: FP8
    weights as stored, with their scales (module docstring)."""
    ckpt = Checkpoint(model_dir)
    cfg, shapes = ckpt.config, expected_shapes(ckpt.config)
    wanted: list[tuple[str, tuple[str, str], tuple[int, ...]]] = []
    for tmpl, names in NAME_TABLE.items():
        if tmpl == "lm_head" and cfg.tie_embeddings:
            continue
        layers = range(cfg.n_layers) if "{i}" in tmpl else [None]
        wanted += [(tmpl.format(i=i) if i is not None else tmpl, names, shapes[tmpl]) for i in layers]
    return _load(ckpt, wanted, dtype, device, keep_fp8)


def load_experts(
    model_dir: str | Path,
    experts: Mapping[int, Iterable[int]],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    keep_fp8: bool = False,
) -> LoadedWeights:
    """Only the given experts: `{layer: [expert ids]}` -> `layers.{i}.experts.{e}.w{1,2,3}`. `keep_fp8`:
    FP8 weights as stored, with their scales (`layers.{i}.experts.{e}.w{1,2,3}.scale`)."""
    ckpt = Checkpoint(model_dir)
    cfg, shapes = ckpt.config, expected_shapes(ckpt.config)
    wanted = []
    for layer, ids in experts.items():
        for e in ids:
            if not (0 <= layer < cfg.n_layers and 0 <= e < cfg.n_experts):
                raise CheckpointError(
                    f"no expert {e} in layer {layer}: the model has {cfg.n_layers} "
                    f"layers of {cfg.n_experts} experts"
                )
            wanted += [
                (f"layers.{layer}.experts.{e}.{w}", EXPERT_TABLE[w], shapes[w]) for w in ("w1", "w2", "w3")
            ]
    return _load(ckpt, wanted, dtype, device, keep_fp8)


def _load(
    ckpt: Checkpoint,
    wanted: list[tuple[str, tuple[str, str], tuple[int, ...]]],
    dtype: torch.dtype,
    device: str | torch.device,
    keep_fp8: bool = False,
) -> LoadedWeights:
    tensors, loaded = {}, set()
    for ours, template, shape in wanted:
        name = ckpt.checkpoint_name(ours, template)
        if keep_fp8 and ours.endswith(FP8_KEPT):
            t, scale, names = ckpt.read_stored(name, shape)
        else:
            (t, names), scale = ckpt.read_weight(name, shape), None
        if ckpt.consolidated and ours.endswith((".wq", ".wk")):  # Mistral's layout: never FP8
            t = _unpermute_rotary(t, ckpt.config, heads_of(ours, ckpt.config))
        if scale is None:
            tensors[ours] = t.to(device=device, dtype=dtype)
        else:  # kept as stored
            tensors[ours], tensors[ours + SCALE] = t.to(device), scale.to(device)
        loaded.update(names)
    log.debug("loaded %d tensors from %s", len(loaded), ckpt.dir)
    return LoadedWeights(tensors, frozenset(loaded))


def heads_of(ours: str, cfg: MixtralConfig) -> int:
    return cfg.n_heads if ours.endswith(".wq") else cfg.n_kv_heads


def _unpermute_rotary(w: torch.Tensor, cfg: MixtralConfig, n_heads: int) -> torch.Tensor:
    """Mistral's interleaved-pair RoPE layout -> the half-split layout we (and HF) rotate.

    The same permutation as transformers' `convert_mixtral_weights_to_hf.py`.
    """
    rows, cols = w.shape  # [H * hd, D]
    return w.view(n_heads, cfg.head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _fields(ours: str) -> dict[str, str]:
    parts = ours.split(".")
    out = {}
    if parts[0] == "layers":
        out["i"] = parts[1]
    if "experts" in parts:
        out["e"] = parts[parts.index("experts") + 1]
    return out


def _open(path: Path):  # type: ignore[no-untyped-def]
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot open {path}: {e} (truncated or not a safetensors file?)") from None
