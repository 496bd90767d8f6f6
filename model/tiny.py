"""Tiny random Mixtral checkpoints in HF format (and Mistral's consolidated format), made on the fly.

The embedded default model (`default_model_dir`) is one of these, built deterministically from a
fixed seed with the real Mixtral tokenizer, so `make serve` needs no download. Weights are scaled
(linear std 1/sqrt(fan_in), unit-ish norms, unit embeddings) so activations neither vanish nor
explode and greedy decoding is not one token forever.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moray.model.config import MixtralConfig
from moray.model.tokenizer import default_tokenizer_path
from moray.model.weights import EXPERT_TABLE, NAME_TABLE


@dataclass(frozen=True)
class TinySpec:
    layers: int = 4
    dim: int = 128
    heads: int = 4
    kv_heads: int = 2
    experts: int = 8
    top_k: int = 2
    hidden: int = 256
    vocab: int = 32000
    seed: int = 0
    max_seq_len: int = 4096
    rope_theta: float = 1e6
    norm_eps: float = 1e-5

    def config(self) -> MixtralConfig:
        return MixtralConfig(vocab_size=self.vocab, dim=self.dim, n_layers=self.layers, n_heads=self.heads,
                             n_kv_heads=self.kv_heads, head_dim=self.dim // self.heads, hidden_dim=self.hidden,
                             n_experts=self.experts, top_k=self.top_k, rope_theta=self.rope_theta,
                             norm_eps=self.norm_eps, max_seq_len=self.max_seq_len)


SMALL = TinySpec(layers=8, dim=1024, heads=16, kv_heads=4, experts=8, hidden=3584, seed=0)
PRESETS = {"tiny": TinySpec(), "small": SMALL}


def _hf_tensors(spec: TinySpec, router_bias: Mapping[int, float] | None) -> dict[str, torch.Tensor]:
    cfg, g = spec.config(), torch.Generator().manual_seed(spec.seed)

    def linear(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) / cols**0.5

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(cfg.dim, generator=g)

    out = {"model.embed_tokens.weight": torch.randn(cfg.vocab_size, cfg.dim, generator=g)}
    shapes = {"wq": (cfg.q_dim, cfg.dim), "wk": (cfg.kv_dim, cfg.dim), "wv": (cfg.kv_dim, cfg.dim),
              "wo": (cfg.dim, cfg.q_dim), "gate": (cfg.n_experts, cfg.dim)}
    for i in range(cfg.n_layers):
        for ours, (hf, _) in NAME_TABLE.items():
            if not ours.startswith("layers."):
                continue
            leaf = ours.split(".")[-1]
            out[hf.format(i=i)] = norm() if leaf.endswith("norm") else linear(*shapes[leaf])
        for e in range(cfg.n_experts):
            for w, (hf, _) in EXPERT_TABLE.items():
                rows, cols = (cfg.dim, cfg.hidden_dim) if w == "w2" else (cfg.hidden_dim, cfg.dim)
                out[hf.format(i=i, e=e)] = linear(rows, cols)
        for expert, strength in (router_bias or {}).items():
            # A gate row along the layer's mean input direction scores high for every token.
            gate = out[f"model.layers.{i}.block_sparse_moe.gate.weight"]
            gate[expert] = strength * out[f"model.layers.{i}.post_attention_layernorm.weight"]
    out["model.norm.weight"] = norm()
    out["lm_head.weight"] = linear(cfg.vocab_size, cfg.dim)
    return out


def make_tiny(out_dir: str | Path, spec: TinySpec = TinySpec(), *, shards: int = 1,
              router_bias: Mapping[int, float] | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write an HF-format random Mixtral (config.json, safetensors, tokenizer.model) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in _hf_tensors(spec, router_bias).items()}
    config = {**spec.config().to_hf(), "torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _save_sharded(tensors, out, shards)
    shutil.copyfile(default_tokenizer_path(), out / "tokenizer.model")
    return out


def _save_sharded(tensors: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    if shards <= 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_consolidated(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert an HF tiny checkpoint to Mistral's `consolidated.safetensors` + `params.json`.

    HF's q/k rows are in the half-split RoPE layout; Mistral's are interleaved pairs. This applies the
    inverse of transformers' `convert_mixtral_weights_to_hf.py` permutation.
    """
    src, out = Path(hf_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = MixtralConfig.load(src)
    hf = load_file(src / "model.safetensors")
    table = {**NAME_TABLE, **{f"layers.{{i}}.experts.{{e}}.{w}": t for w, t in EXPERT_TABLE.items()}}
    tensors = {}
    for ours, (hf_tmpl, mistral_tmpl) in table.items():
        layers = range(cfg.n_layers) if "{i}" in ours else [0]
        experts = range(cfg.n_experts) if "{e}" in ours else [0]
        for i in layers:
            for e in experts:
                t = hf[hf_tmpl.format(i=i, e=e)]
                if ours.endswith((".wq", ".wk")):
                    t = _to_interleaved(t, cfg.head_dim, cfg.n_heads if ours.endswith(".wq") else cfg.n_kv_heads)
                tensors[mistral_tmpl.format(i=i, e=e)] = t.contiguous()
    save_file(tensors, out / "consolidated.safetensors")
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "head_dim": cfg.head_dim, "hidden_dim": cfg.hidden_dim,
              "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "norm_eps": cfg.norm_eps,
              "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta, "max_seq_len": cfg.max_seq_len,
              "moe": {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k}}
    (out / "params.json").write_text(json.dumps(params, indent=2))
    shutil.copyfile(src / "tokenizer.model", out / "tokenizer.model")
    return out


def _to_interleaved(w: torch.Tensor, head_dim: int, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape  # [h * d, D]: per head [d/2 firsts; d/2 seconds] -> pairs
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def default_model_dir(spec: TinySpec = TinySpec(), cache: str | Path | None = None) -> Path:
    """The embedded default model: built once per spec into a cache dir, atomically, then reused."""
    root = Path(cache or os.environ.get("MORAY_CACHE") or Path.home() / ".cache" / "moray")
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    target = root / f"tiny-{key}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    make_tiny(tmp, spec)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def spec_with(spec: TinySpec, **changes: int) -> TinySpec:
    return replace(spec, **{k: v for k, v in changes.items() if v is not None})
