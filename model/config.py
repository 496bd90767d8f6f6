"""Mixtral architecture config: a frozen dataclass read from HF `config.json` or Mistral `params.json`.

Both formats are accepted because real checkpoints come in both.
transformers 5 writes `rope_parameters: {rope_theta, rope_type}` and `head_dim: null`; older HF and
Mistral configs carry `rope_theta` at the top level. A missing theta is an error, not a silent 1e4.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A checkpoint directory whose config is missing or inconsistent."""


@dataclass(frozen=True)
class MixtralConfig:
    vocab_size: int = 32000
    dim: int = 4096  # D: model width
    n_layers: int = 32
    n_heads: int = 32  # H: query heads
    n_kv_heads: int = 8  # KV heads (GQA: n_heads // n_kv_heads queries share one)
    head_dim: int = 128
    hidden_dim: int = 14336  # F: SwiGLU hidden width of one expert
    n_experts: int = 8  # E
    top_k: int = 2  # A: active experts per token
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    max_seq_len: int = 32768
    bos_id: int = 1
    eos_id: int = 2
    tie_embeddings: bool = False
    # The checkpoint's weight quantization (config.json `quantization_config`); None: plain float weights.
    checkpoint_quant: CheckpointQuant | None = None

    def __post_init__(self) -> None:
        checks = {
            "n_heads must be a multiple of n_kv_heads": self.n_heads % self.n_kv_heads == 0,
            "top_k must be in 1..n_experts": 1 <= self.top_k <= self.n_experts,
            "head_dim must be even (RoPE rotates pairs)": self.head_dim % 2 == 0,
            "sizes must be positive": min(self.vocab_size, self.dim, self.n_layers, self.hidden_dim) > 0,
        }
        failed = [msg for msg, ok in checks.items() if not ok]
        if failed:
            raise ConfigError(f"invalid Mixtral config: {'; '.join(failed)}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def expert_bytes(self, dtype_bytes: int = 4) -> int:
        """Bytes of one expert's w1, w2, w3."""
        return 3 * self.dim * self.hidden_dim * dtype_bytes

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> MixtralConfig:
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta"))
        if theta is None:
            raise ConfigError("config.json has no rope_theta (top level or rope_parameters)")
        n_heads = _need(cfg, "num_attention_heads")
        dim = _need(cfg, "hidden_size")
        quant = cfg.get("quantization_config")
        return cls(
            vocab_size=_need(cfg, "vocab_size"),
            dim=dim,
            n_layers=_need(cfg, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or dim // n_heads,
            hidden_dim=_need(cfg, "intermediate_size"),
            n_experts=_need(cfg, "num_local_experts"),
            top_k=_need(cfg, "num_experts_per_tok"),
            rope_theta=float(theta),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            max_seq_len=int(cfg.get("max_position_embeddings", 32768)),
            bos_id=_first_id(cfg.get("bos_token_id"), 1),
            eos_id=_first_id(cfg.get("eos_token_id"), 2),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            checkpoint_quant=None if quant is None else CheckpointQuant.from_hf(quant),
        )

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> MixtralConfig:
        moe = p.get("moe") or {}
        if "rope_theta" not in p:
            raise ConfigError("params.json has no rope_theta")
        return cls(
            vocab_size=_need(p, "vocab_size"),
            dim=_need(p, "dim"),
            n_layers=_need(p, "n_layers"),
            n_heads=_need(p, "n_heads"),
            n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
            head_dim=p.get("head_dim") or p["dim"] // p["n_heads"],
            hidden_dim=_need(p, "hidden_dim"),
            n_experts=int(moe.get("num_experts", 8)),
            top_k=int(moe.get("num_experts_per_tok", 2)),
            rope_theta=float(p["rope_theta"]),
            norm_eps=float(p.get("norm_eps", 1e-5)),
            max_seq_len=int(p.get("max_seq_len", 32768)),
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> MixtralConfig:
        d = Path(model_dir)
        if not d.is_dir():
            raise ConfigError(f"model directory {d} does not exist")
        if (d / "config.json").is_file():
            return cls.from_hf(_read_json(d / "config.json"))
        if (d / "params.json").is_file():
            return cls.from_params(_read_json(d / "params.json"))
        raise ConfigError(f"{d} has neither config.json nor params.json: not a Mixtral checkpoint")

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "num_local_experts": self.n_experts,
            "num_experts_per_tok": self.top_k,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "tie_word_embeddings": self.tie_embeddings,
        }


FP8_STRATEGIES = ("tensor", "channel")
# Both store an 8-bit float weight as float8_e4m3fn beside its scale (the library writes "naive-quantized"
# unless told "float-quantized", which public FP8 checkpoints carry).
FP8_FORMATS = ("float-quantized", "naive-quantized")


@dataclass(frozen=True)
class CheckpointQuant:
    """A compressed-tensors `quantization_config` that moray loads: FP8 (float8_e4m3fn) weights with a
    `weight_scale` per tensor or per output channel. Weight-only: `input_scale` (static activation
    scales) is not used, the weights are dequantized at load. Layers in `ignore` are stored unquantized
    and are read as they are (the loader goes by the tensors: a weight with a `weight_scale` is FP8)."""

    strategies: frozenset[str]  # weight strategies of its config groups: "tensor" and/or "channel"

    @classmethod
    def from_hf(cls, q: Any) -> CheckpointQuant:
        if not isinstance(q, dict):
            raise ConfigError("quantization_config must be a JSON object")
        method = q.get("quant_method")
        if method != "compressed-tensors":
            raise ConfigError(f"unsupported quantization_config quant_method {method!r}: moray loads "
                              "compressed-tensors FP8 checkpoints only")
        fmt = q.get("format")
        groups = q.get("config_groups") or {}
        if not isinstance(groups, dict) or not groups:
            raise ConfigError("compressed-tensors quantization_config has no config_groups")
        return cls(frozenset(_fp8_strategy(name, g, fmt) for name, g in groups.items()))

    def scale_sizes(self, out_features: int) -> set[int]:
        """Element counts a `weight_scale` may have for a weight of `out_features` rows."""
        return {n for s, n in (("tensor", 1), ("channel", out_features)) if s in self.strategies}


def _fp8_strategy(name: str, group: Any, fmt: Any) -> str:
    """The weight strategy of one config group, which must be FP8 per tensor or per channel."""
    weights = group.get("weights") if isinstance(group, dict) else None
    fmt = (group.get("format") if isinstance(group, dict) else None) or fmt
    if not isinstance(weights, dict):
        raise ConfigError(f"compressed-tensors config group {name!r} quantizes no weights")
    kind = (weights.get("type"), weights.get("num_bits"), weights.get("strategy"))
    if fmt not in FP8_FORMATS or kind[:2] != ("float", 8) or kind[2] not in FP8_STRATEGIES:
        detail = f"format {fmt!r}, {kind[0]} {kind[1]}-bit weights, strategy {kind[2]!r}"
        if weights.get("group_size"):
            detail += f", group size {weights['group_size']}"
        raise ConfigError(f"unsupported compressed-tensors config group {name!r} ({detail}): moray "
                          "loads FP8 (float-quantized) weights per tensor or per channel only")
    if weights.get("symmetric") is False:
        raise ConfigError(f"unsupported compressed-tensors config group {name!r}: asymmetric FP8 weights")
    return str(kind[2])


def _need(cfg: dict[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise ConfigError(f"config is missing required field {key!r}")
    return cfg[key]


def _first_id(value: Any, default: int) -> int:
    if isinstance(value, list):
        return int(value[0]) if value else default
    return default if value is None else int(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data
