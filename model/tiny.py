"""Tiny random Mixtral checkpoints in HF format (and Mistral's consolidated format), made on the fly.

The embedded default model (`default_model_dir`) is one of these, built deterministically from a
fixed seed with mistral-common's v3 tokenizer (Mixtral-8x22B-Instruct's format, tool tokens included),
so `make serve` needs no download.

Weights: every tensor comes from its own generator, seeded by (spec.seed, tensor name), so a tensor
does not depend on which others are made or in which file it lands. Scales keep activations
alive through the layers: linear layers std 1/sqrt(fan_in), norms 1 + 0.1·noise, embeddings
std 1 plus a shared offset (every token embedding has a common component, as trained models'
residual streams do). Gates are then calibrated by one forward pass on random tokens (see
`calibrate_gates`): balanced routing by default, and `router_bias` boosts chosen experts along
the common direction of every router input.

Shapes: V vocabulary, D model width, F expert hidden width, E experts, H heads, K KV heads, d head dim.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from moray.model.config import MixtralConfig
from moray.model.tokenizer import tools_tokenizer_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # part of the default model's cache key: bump when the weights' recipe changes
EMBED_OFFSET = 0.5  # per-element std of the component shared by all token embeddings
NORM_NOISE = 0.1
# The v3 tokenizer under Mistral's versioned name (its chat format, for moray and vLLM's
# `--tokenizer-mode mistral`) and as `tokenizer.model` (for sentencepiece/HF loaders).
TOKENIZER_FILES = ("tokenizer.model.v3", "tokenizer.model")


@dataclass(frozen=True)
class TinySpec:
    layers: int = 4
    dim: int = 128  # D
    heads: int = 4  # H (head_dim = dim // heads)
    kv_heads: int = 2  # K
    experts: int = 8  # E
    top_k: int = 2
    hidden: int = 256  # F
    vocab: int = 32768  # V (mistral-common's v3 tokenizer, with the tool-calling control tokens, has 32768)
    seed: int = 0
    max_seq_len: int = 4096
    rope_theta: float = 1e6
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        checks = {
            "sizes must be positive": min(
                self.layers,
                self.dim,
                self.heads,
                self.kv_heads,
                self.experts,
                self.hidden,
                self.vocab,
                self.max_seq_len,
            )
            > 0,
            "dim must be a multiple of heads": self.dim % self.heads == 0,
            "head_dim (dim // heads) must be even": (self.dim // self.heads) % 2 == 0,
            "heads must be a multiple of kv_heads": self.heads % self.kv_heads == 0,
            "top_k must be in 1..experts": 1 <= self.top_k <= self.experts,
        }
        failed = [msg for msg, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid tiny spec: {'; '.join(failed)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def config(self) -> MixtralConfig:
        return MixtralConfig(
            vocab_size=self.vocab,
            dim=self.dim,
            n_layers=self.layers,
            n_heads=self.heads,
            n_kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            hidden_dim=self.hidden,
            n_experts=self.experts,
            top_k=self.top_k,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            max_seq_len=self.max_seq_len,
        )


# The "small" config: reading the expert weights dominates a decode step.
SMALL = TinySpec(layers=8, dim=1024, heads=16, kv_heads=4, experts=8, hidden=3584)
PRESETS = {"tiny": TinySpec(), "small": SMALL}


# ---- names and shapes -----------------------------------------------------------------------------
def hf_shapes(spec: TinySpec) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name and its shape, in file order (embeddings, layer by layer, head)."""
    D, F, q, kv = spec.dim, spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab, D)}
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (D,),
            f"{p}.self_attn.q_proj.weight": (q, D),
            f"{p}.self_attn.k_proj.weight": (kv, D),
            f"{p}.self_attn.v_proj.weight": (kv, D),
            f"{p}.self_attn.o_proj.weight": (D, q),
            f"{p}.post_attention_layernorm.weight": (D,),
            f"{p}.block_sparse_moe.gate.weight": (spec.experts, D),
        }
        for e in range(spec.experts):
            x = f"{p}.block_sparse_moe.experts.{e}"
            shapes |= {f"{x}.w1.weight": (F, D), f"{x}.w2.weight": (D, F), f"{x}.w3.weight": (F, D)}
    return shapes | {"model.norm.weight": (D,), "lm_head.weight": (spec.vocab, D)}


def hf_config(spec: TinySpec, dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """`config.json` as transformers' MixtralConfig writes it (theta both at the top level and in
    transformers 5's `rope_parameters`, so either reader finds it)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": spec.vocab,
        "hidden_size": spec.dim,
        "intermediate_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "num_local_experts": spec.experts,
        "num_experts_per_tok": spec.top_k,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_parameters": {"rope_theta": spec.rope_theta, "rope_type": "default"},
        "max_position_embeddings": spec.max_seq_len,
        "sliding_window": None,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "router_aux_loss_coef": 0.02,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ---- weights --------------------------------------------------------------------------------------
def _generator(spec: TinySpec, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"moray-tiny/{spec.seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _offset_direction(spec: TinySpec) -> torch.Tensor:
    """The embeddings' shared component [D] (per-element std EMBED_OFFSET)."""
    return EMBED_OFFSET * torch.randn(spec.dim, generator=_generator(spec, "embed_offset"))


def _random_tensor(spec: TinySpec, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = _generator(spec, name)
    if name == "model.embed_tokens.weight":
        return torch.randn(shape, generator=g) + _offset_direction(spec)[None, :]
    if name.endswith("norm.weight"):
        return 1.0 + NORM_NOISE * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / shape[-1] ** 0.5  # linear [out, in]: std 1/sqrt(fan_in)


def random_weights(spec: TinySpec, router_bias: Mapping[int, float] | None = None) -> dict[str, torch.Tensor]:
    """All HF tensors (fp32), gates calibrated on random tokens: see `calibrate_gates`."""
    tensors = {name: _random_tensor(spec, name, shape) for name, shape in hf_shapes(spec).items()}
    calibrate_gates(tensors, spec, dict(router_bias or {}))
    return tensors


# ---- gate calibration -----------------------------------------------------------------------------
# A random model's router inputs share a large common component (the embeddings' offset, and what
# attention's averaging makes of it). Left alone, it hands each expert a constant logit bonus, and
# a few experts take most tokens. Calibration runs the model once on random tokens, layer by layer,
# and makes each gate row orthogonal to the mean router input m (balanced routing); `router_bias`
# then adds strength * m / |m|^2 to an expert's row: a logit boost of `strength` on the average input.
CALIBRATION_TOKENS = (8, 64)  # sequences x tokens


def calibrate_gates(
    tensors: dict[str, torch.Tensor], spec: TinySpec, router_bias: Mapping[int, float]
) -> None:
    g = _generator(spec, "calibration")
    ids = torch.randint(3, spec.vocab, CALIBRATION_TOKENS, generator=g)  # [B, T]
    h = tensors["model.embed_tokens.weight"][ids]  # [B, T, D]
    cos, sin = _rope(spec, ids.shape[1])
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        attn_in = _rms_norm(h, tensors[f"{p}.input_layernorm.weight"], spec)
        h = h + _attention(tensors, p, spec, attn_in, cos, sin)
        x = _rms_norm(h, tensors[f"{p}.post_attention_layernorm.weight"], spec).flatten(0, 1)  # [N, D]
        gate = tensors[f"{p}.block_sparse_moe.gate.weight"]  # [E, D]
        mean = x.mean(dim=0)  # [D]
        gate -= (gate @ mean)[:, None] * mean[None, :] / mean.dot(mean)
        for expert, strength in router_bias.items():
            gate[expert] += strength * mean / mean.dot(mean)
        h = h + _moe(tensors, p, spec, x).view_as(h)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, spec: TinySpec) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec.norm_eps) * weight


def _rope(spec: TinySpec, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's rotate_half RoPE tables [T, d] (HF q/k rows are in that layout)."""
    inv_freq = spec.rope_theta ** -(torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [T, d/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, d]
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _attention(
    t: dict[str, torch.Tensor], p: str, spec: TinySpec, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    B, T, _ = x.shape

    def heads(name: str, n: int) -> torch.Tensor:
        return (x @ t[f"{p}.self_attn.{name}.weight"].T).view(B, T, n, spec.head_dim).transpose(1, 2)

    q, k = _rotate(heads("q_proj", spec.heads), cos, sin), _rotate(heads("k_proj", spec.kv_heads), cos, sin)
    v, rep = heads("v_proj", spec.kv_heads), spec.heads // spec.kv_heads  # [B, K, T, d]
    out = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True
    )  # [B, H, T, d]
    return out.transpose(1, 2).reshape(B, T, -1) @ t[f"{p}.self_attn.o_proj.weight"].T


def _moe(t: dict[str, torch.Tensor], p: str, spec: TinySpec, x: torch.Tensor) -> torch.Tensor:
    """Mixtral's sparse MoE, one expert at a time: [N, D] -> [N, D]."""
    weights, chosen = (x @ t[f"{p}.block_sparse_moe.gate.weight"].T).softmax(-1).topk(spec.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)  # [N, A]
    y = torch.zeros_like(x)
    for e in range(spec.experts):
        rows, slot = torch.where(chosen == e)
        w = {k: t[f"{p}.block_sparse_moe.experts.{e}.{k}.weight"] for k in ("w1", "w2", "w3")}
        xe = x[rows]
        ye = (F.silu(xe @ w["w1"].T) * (xe @ w["w3"].T)) @ w["w2"].T  # [n, D]
        y.index_add_(0, rows, weights[rows, slot, None] * ye)
    return y


def _shard_names(shapes: dict[str, tuple[int, ...]], shards: int) -> list[list[str]]:
    """Split the names, in order, into `shards` non-empty contiguous groups of about equal bytes."""
    names = list(shapes)
    if not 1 <= shards <= len(names):
        raise ValueError(f"shards must be in 1..{len(names)}, got {shards}")
    cumulative = list(itertools.accumulate(torch.Size(shapes[n]).numel() for n in names))
    cuts = [0]
    for k in range(1, shards):
        at = bisect.bisect_left(cumulative, k * cumulative[-1] / shards) + 1  # first group ends here
        cuts.append(min(max(at, cuts[-1] + 1), len(names) - (shards - k)))
    cuts.append(len(names))
    return [names[a:b] for a, b in itertools.pairwise(cuts)]


def make_tiny(
    out_dir: str | Path,
    spec: TinySpec = TinySpec(),
    *,
    shards: int = 1,
    router_bias: Mapping[int, float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random HF-format Mixtral checkpoint into `out_dir`: config.json, safetensors (one file, or
    `shards` files + `model.safetensors.index.json`), mistral-common's v3 tokenizer as tokenizer.model.v3
    and tokenizer.model. `router_bias={expert: strength}` makes every layer's gate prefer those
    experts by about `strength` router logits. Deterministic: same arguments, same bytes."""
    bias = dict(router_bias or {})
    if any(not 0 <= e < spec.experts for e in bias):
        raise ValueError(f"router_bias experts must be in 0..{spec.experts - 1}, got {sorted(bias)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = hf_shapes(spec)
    groups = _shard_names(shapes, shards)
    files = (
        ["model.safetensors"]
        if shards == 1
        else [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    )
    tensors = random_weights(spec, bias)
    for file, names in zip(files, groups, strict=True):
        part = {n: tensors[n].to(dtype).contiguous() for n in names}
        save_file(part, out / file, metadata={"format": "pt"})
    if shards > 1:
        _write_index(out, files, groups, shapes, dtype)
    (out / "config.json").write_text(json.dumps(hf_config(spec, dtype), indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(tools_tokenizer_path(), out / name)
    log.info("wrote a random Mixtral %s to %s", spec, out)
    return out


def _write_index(
    out: Path,
    files: list[str],
    groups: list[list[str]],
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
) -> None:
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(torch.Size(s).numel() for s in shapes.values()) * itemsize
    weight_map = {n: f for f, names in zip(files, groups, strict=True) for n in names}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---- Mistral's consolidated format --------------------------------------------------------------
def _consolidated_name(hf_name: str) -> str:
    """HF name -> Mistral's consolidated name (mistral-inference / vLLM's mistral loader)."""
    fixed = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    parts = {
        ".input_layernorm.": ".attention_norm.",
        ".post_attention_layernorm.": ".ffn_norm.",
        ".self_attn.q_proj.": ".attention.wq.",
        ".self_attn.k_proj.": ".attention.wk.",
        ".self_attn.v_proj.": ".attention.wv.",
        ".self_attn.o_proj.": ".attention.wo.",
        ".block_sparse_moe.": ".feed_forward.",
    }
    name = hf_name.removeprefix("model.")
    for hf, mistral in parts.items():
        name = name.replace(hf, mistral)
    return name


def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the q/k row permutation of transformers' `convert_mixtral_weights_to_hf.py`.

    Mistral's rotary embedding rotates interleaved pairs (rows 2j, 2j+1 of each head: complex
    numbers), HF's `rotate_half` rotates the two halves (rows j and j + d/2). The converter permutes
    each head's rows so the halves line up:
        hf = w.view(H, d // 2, 2, D).transpose(1, 2).reshape(H * d, D)
    and this is its inverse:
        w = hf.view(H, 2, d // 2, D).transpose(1, 2).reshape(H * d, D)
    """
    rows, cols = w.shape  # [H * d, D]
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_tensors(hf_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = hf_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    for file in files:
        with safe_open(str(hf_dir / file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def write_consolidated(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert an HF Mixtral checkpoint into Mistral's format: `params.json` + `consolidated.safetensors`
    (q/k rows back in the interleaved RoPE layout), with the tokenizer."""
    src, out = Path(hf_dir), Path(out_dir)
    cfg = MixtralConfig.load(src)
    out.mkdir(parents=True, exist_ok=True)
    heads = {".attention.wq.": cfg.n_heads, ".attention.wk.": cfg.n_kv_heads}
    tensors = {}
    for hf_name, t in _hf_tensors(src):
        name = _consolidated_name(hf_name)
        n_heads = next((h for key, h in heads.items() if key in name), None)
        tensors[name] = (hf_to_interleaved(t, n_heads) if n_heads else t).contiguous()
    save_file(tensors, out / "consolidated.safetensors", metadata={"format": "pt"})
    params = {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "head_dim": cfg.head_dim,
        "hidden_dim": cfg.hidden_dim,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "norm_eps": cfg.norm_eps,
        "vocab_size": cfg.vocab_size,
        "rope_theta": cfg.rope_theta,
        "max_seq_len": cfg.max_seq_len,
        "moe": {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k},
    }
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    for name in (*TOKENIZER_FILES, "tokenizer.model.v1"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


# ---- the embedded default -------------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("MORAY_CACHE") or Path.home() / ".cache" / "moray")


def default_model_dir(spec: TinySpec = TinySpec(), cache: str | Path | None = None) -> Path:
    """The embedded default model: built once per spec into `cache` (default `$MORAY_CACHE` or
    ~/.cache/moray) as `tiny-<hash>`, atomically (built aside, then renamed), and reused after."""
    root = Path(cache) if cache is not None else cache_root()
    key = json.dumps({"format": FORMAT_VERSION, **asdict(spec)}, sort_keys=True)
    target = root / f"tiny-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        make_tiny(building, spec)
        building.rename(target)
        log.info("built the embedded tiny model in %s", target)
    except OSError:
        if not (target / "config.json").is_file():  # not another process winning the race
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target
