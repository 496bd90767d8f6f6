"""Tiny random checkpoints: HF layout and names, transformers loads and runs them, sharding,
router bias, determinism, Mistral's consolidated format, the cached default.

Oracles: transformers (`MixtralConfig`, `MixtralForCausalLM`, its rotary embedding), the naming
in COMMON.md, transformers' converter permutation and mistral-inference's complex RoPE.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moray.model.tiny import (
    SMALL,
    TinySpec,
    default_model_dir,
    hf_to_interleaved,
    make_tiny,
    write_consolidated,
)
from moray.model.tokenizer import tools_tokenizer_path

transformers = pytest.importorskip("transformers")

SPEC = TinySpec(layers=2, dim=64, heads=4, kv_heads=2, experts=4, hidden=96, seed=7)


def expected_names(spec: TinySpec) -> set[str]:
    """The HF Mixtral names listed in COMMON.md."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        names |= {
            f"{p}.input_layernorm.weight",
            f"{p}.post_attention_layernorm.weight",
            f"{p}.block_sparse_moe.gate.weight",
        }
        names |= {f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {
            f"{p}.block_sparse_moe.experts.{e}.{w}.weight"
            for e in range(spec.experts)
            for w in ("w1", "w2", "w3")
        }
    return names


def all_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        out |= load_file(file)
    return out


def hf_model(model_dir: Path) -> tuple[object, dict[str, object]]:
    loaded: tuple[object, dict[str, object]] = transformers.MixtralForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    return loaded


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny-small"), SPEC)


# ---- layout -------------------------------------------------------------------------------------
def test_files_names_and_shapes(tiny_dir: Path) -> None:
    spec = TinySpec()
    assert (tiny_dir / "config.json").is_file() and (tiny_dir / "model.safetensors").is_file()
    for name in ("tokenizer.model", "tokenizer.model.v3"):  # v3: the tool-calling control tokens
        assert (tiny_dir / name).read_bytes() == tools_tokenizer_path().read_bytes()
    tensors = all_tensors(tiny_dir)
    assert set(tensors) == expected_names(spec)
    D, F = spec.dim, spec.hidden
    assert tensors["model.embed_tokens.weight"].shape == (32768, D) == tensors["lm_head.weight"].shape
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (spec.kv_heads * D // spec.heads, D)
    assert tensors["model.layers.3.block_sparse_moe.gate.weight"].shape == (spec.experts, D)
    assert tensors["model.layers.1.block_sparse_moe.experts.7.w1.weight"].shape == (F, D)
    assert tensors["model.layers.1.block_sparse_moe.experts.7.w2.weight"].shape == (D, F)
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_config_is_transformers_mixtral(tiny_dir: Path) -> None:
    raw = json.loads((tiny_dir / "config.json").read_text())
    assert raw["architectures"] == ["MixtralForCausalLM"] and raw["model_type"] == "mixtral"
    cfg = transformers.MixtralConfig.from_pretrained(tiny_dir)
    spec = TinySpec()
    assert (cfg.hidden_size, cfg.intermediate_size) == (spec.dim, spec.hidden)
    assert cfg.num_hidden_layers == spec.layers
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (spec.heads, spec.kv_heads)
    assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (spec.experts, spec.top_k)
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id) == (32768, 1, 2)
    assert cfg.rms_norm_eps == spec.norm_eps and cfg.max_position_embeddings == spec.max_seq_len
    assert cfg.tie_word_embeddings is False
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    assert rope["rope_theta"] == 1e6


def test_transformers_loads_and_decodes(tiny_dir: Path) -> None:
    model, info = hf_model(tiny_dir)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    prompt = torch.tensor([[1, 22557, 28725, 910, 460, 368, 28804]])  # "<s>Hello, how are you?"
    with torch.no_grad():
        logits = model(prompt).logits  # type: ignore[operator]
        generated = model.generate(prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1] :]  # type: ignore[attr-defined]
    assert torch.isfinite(logits).all() and 0.3 < float(logits.std()) < 10
    assert len(set(generated.tolist())) >= 4, generated.tolist()


def test_sharded_equals_unsharded(small_dir: Path, tmp_path: Path) -> None:
    sharded = make_tiny(tmp_path / "sharded", SPEC, shards=3)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    one, three = all_tensors(small_dir), all_tensors(sharded)
    assert set(index["weight_map"]) == set(one) == set(three)
    for name, file in index["weight_map"].items():
        with safe_open(str(sharded / file), framework="pt") as f:
            assert name in f.keys()  # noqa: SIM118
        assert torch.equal(one[name], three[name]), name
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in one.values())
    model, info = hf_model(sharded)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_deterministic_bytes(small_dir: Path, tmp_path: Path) -> None:
    again = make_tiny(tmp_path / "again", SPEC)
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        assert (again / name).read_bytes() == (small_dir / name).read_bytes(), name
    other = all_tensors(make_tiny(tmp_path / "other", TinySpec(**{**SPEC.__dict__, "seed": 8})))
    assert not torch.equal(other["lm_head.weight"], all_tensors(small_dir)["lm_head.weight"])


def top1_share(model_dir: Path, expert: int | None = None) -> torch.Tensor:
    """Per layer: the top-1 share of `expert` (None: of the most picked expert) on random tokens [L]."""
    model, _ = hf_model(model_dir)
    tokens = torch.randint(3, 32000, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        router = model(tokens, output_router_logits=True).router_logits  # type: ignore[operator]
    shares = []
    for logits in router:  # [N, E]
        counts = torch.bincount(logits.argmax(-1), minlength=logits.shape[-1]).float() / logits.shape[0]
        shares.append(counts.max() if expert is None else counts[expert])
    return torch.stack(shares)


def test_router_bias_makes_an_expert_hot(tmp_path: Path) -> None:
    biased = make_tiny(tmp_path / "biased", SPEC, router_bias={2: 3.0})
    assert bool((top1_share(biased, expert=2) > 0.5).all())
    plain = all_tensors(make_tiny(tmp_path / "plain", SPEC))
    hot = all_tensors(biased)
    changed = {n for n in plain if not torch.equal(plain[n], hot[n])}
    assert "model.layers.0.block_sparse_moe.gate.weight" in changed
    assert all(n.endswith("block_sparse_moe.gate.weight") for n in changed)  # only the routers move


def test_unbiased_routing_is_spread(tiny_dir: Path) -> None:
    assert bool((top1_share(tiny_dir) < 0.35).all())  # 8 experts: 0.125 each when perfectly even


def test_bfloat16(tmp_path: Path) -> None:
    d = make_tiny(tmp_path / "bf16", SPEC, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in all_tensors(d).values())
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_invalid_specs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of heads"):
        TinySpec(dim=130, heads=4)
    with pytest.raises(ValueError, match="kv_heads"):
        TinySpec(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="top_k"):
        TinySpec(experts=2, top_k=3)
    with pytest.raises(ValueError, match="shards"):
        make_tiny(tmp_path, SPEC, shards=0)
    with pytest.raises(ValueError, match="router_bias"):
        make_tiny(tmp_path, SPEC, router_bias={9: 1.0})
    assert (SMALL.dim, SMALL.hidden, SMALL.layers, SMALL.experts, SMALL.heads, SMALL.kv_heads) == (
        1024,
        3584,
        8,
        8,
        16,
        4,
    )


# ---- Mistral's consolidated format --------------------------------------------------------------
def converter_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_mixtral_weights_to_hf.py: Mistral -> HF rows for q/k."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def mistral_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """mistral-inference's rotary embedding: interleaved pairs as complex numbers. x [T, H, d]."""
    T, _, d = x.shape
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    cis = torch.polar(torch.ones(T, d // 2), torch.outer(torch.arange(T).float(), freqs))  # [T, d/2]
    rotated = torch.view_as_complex(x.float().reshape(T, x.shape[1], -1, 2)) * cis[:, None, :]
    return torch.view_as_real(rotated).flatten(-2)


def test_consolidated_names_params_and_tensors(small_dir: Path, tmp_path: Path) -> None:
    out = write_consolidated(small_dir, tmp_path / "c")
    params = json.loads((out / "params.json").read_text())
    assert (params["dim"], params["n_layers"], params["hidden_dim"]) == (SPEC.dim, SPEC.layers, SPEC.hidden)
    assert (params["n_heads"], params["n_kv_heads"], params["head_dim"]) == (SPEC.heads, SPEC.kv_heads, 16)
    assert params["moe"] == {"num_experts": SPEC.experts, "num_experts_per_tok": SPEC.top_k}
    assert params["rope_theta"] == 1e6 and params["vocab_size"] == 32768 and params["norm_eps"] == 1e-5
    mistral, hf = load_file(out / "consolidated.safetensors"), all_tensors(small_dir)
    names = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(SPEC.layers):
        names |= {f"layers.{i}.attention.w{x}.weight" for x in "qkvo"}
        names |= {
            f"layers.{i}.attention_norm.weight",
            f"layers.{i}.ffn_norm.weight",
            f"layers.{i}.feed_forward.gate.weight",
        }
        names |= {
            f"layers.{i}.feed_forward.experts.{e}.w{w}.weight" for e in range(SPEC.experts) for w in (1, 2, 3)
        }
    assert set(mistral) == names
    assert torch.equal(mistral["output.weight"], hf["lm_head.weight"])
    assert torch.equal(
        mistral["layers.1.feed_forward.experts.3.w2.weight"],
        hf["model.layers.1.block_sparse_moe.experts.3.w2.weight"],
    )
    assert torch.equal(mistral["layers.1.attention.wv.weight"], hf["model.layers.1.self_attn.v_proj.weight"])
    for x, heads in (("q", SPEC.heads), ("k", SPEC.kv_heads)):  # the converter maps ours back to HF's
        assert torch.equal(
            converter_permute(mistral[f"layers.0.attention.w{x}.weight"], heads),
            hf[f"model.layers.0.self_attn.{x}_proj.weight"],
        )


def test_consolidated_rope_scores_equal_transformers(small_dir: Path, tmp_path: Path) -> None:
    """Mistral's interleaved RoPE on consolidated weights gives HF's rotate_half RoPE scores on HF weights."""
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding, apply_rotary_pos_emb

    mistral, hf = (
        load_file(write_consolidated(small_dir, tmp_path / "c") / "consolidated.safetensors"),
        all_tensors(small_dir),
    )
    T, d, rep = 11, SPEC.dim // SPEC.heads, SPEC.heads // SPEC.kv_heads
    x = torch.randn(T, SPEC.dim, generator=torch.Generator().manual_seed(1))
    q_hf = (x @ hf["model.layers.1.self_attn.q_proj.weight"].T).view(1, T, SPEC.heads, d).transpose(1, 2)
    k_hf = (x @ hf["model.layers.1.self_attn.k_proj.weight"].T).view(1, T, SPEC.kv_heads, d).transpose(1, 2)
    rotary = MixtralRotaryEmbedding(transformers.MixtralConfig.from_pretrained(small_dir))
    cos, sin = rotary(x[None], torch.arange(T)[None])
    q_hf, k_hf = apply_rotary_pos_emb(q_hf, k_hf, cos, sin)  # [1, H, T, d]
    scores_hf = q_hf[0] @ k_hf[0].repeat_interleave(rep, 0).transpose(1, 2)  # [H, T, T]
    q = mistral_rope((x @ mistral["layers.1.attention.wq.weight"].T).view(T, SPEC.heads, d), 1e6)
    k = mistral_rope((x @ mistral["layers.1.attention.wk.weight"].T).view(T, SPEC.kv_heads, d), 1e6)
    scores = q.transpose(0, 1) @ k.transpose(0, 1).repeat_interleave(rep, 0).transpose(1, 2)
    torch.testing.assert_close(scores, scores_hf, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(
        hf_to_interleaved(hf["model.layers.1.self_attn.q_proj.weight"], SPEC.heads),
        hf["model.layers.1.self_attn.q_proj.weight"],
    )


# ---- the embedded default -----------------------------------------------------------------------
def test_default_model_dir_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MORAY_CACHE", str(tmp_path))
    first = default_model_dir()
    assert first.parent == tmp_path and first.name.startswith("tiny-")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no half-built leftovers
    other = default_model_dir(TinySpec(seed=1), cache=tmp_path / "elsewhere")
    assert other.parent == tmp_path / "elsewhere" and other.name != first.name
    assert transformers.MixtralConfig.from_pretrained(first).num_local_experts == 8
