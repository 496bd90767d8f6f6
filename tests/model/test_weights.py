"""Loading by role, both checkpoint formats, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moray.model.config import ConfigError, MixtralConfig
from moray.model.mixtral import load_local
from moray.model.tiny import TinySpec, make_tiny, write_consolidated
from moray.model.weights import CheckpointError, load_attention, load_experts

SPEC = TinySpec(layers=2, dim=32, heads=4, kv_heads=2, experts=4, hidden=48, seed=5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("w"), SPEC)


def test_expert_role_reads_exactly_its_tensors(ckpt: Path) -> None:
    loaded = load_experts(ckpt, {0: [1, 2]})
    names = {
        f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for e in (1, 2) for w in ("w1", "w2", "w3")
    }
    assert loaded.loaded == names
    assert loaded.nbytes == 2 * MixtralConfig.load(ckpt).expert_bytes(4)


def test_attention_role_holds_no_expert(ckpt: Path) -> None:
    loaded = load_attention(ckpt)
    assert not [n for n in loaded.loaded if "experts" in n]
    assert "model.layers.1.block_sparse_moe.gate.weight" in loaded.loaded
    assert "lm_head.weight" in loaded.loaded


def test_roles_together_read_the_whole_checkpoint(ckpt: Path) -> None:
    on_disk = set(load_file(ckpt / "model.safetensors"))
    cfg = MixtralConfig.load(ckpt)
    everything = {layer: range(cfg.n_experts) for layer in range(cfg.n_layers)}
    assert load_attention(ckpt).loaded | load_experts(ckpt, everything).loaded == on_disk


def test_sharded_and_consolidated_load_the_same_model(ckpt: Path, tmp_path: Path) -> None:
    sharded = make_tiny(tmp_path / "sharded", SPEC, shards=3)
    consolidated = write_consolidated(ckpt, tmp_path / "consolidated")
    assert MixtralConfig.load(consolidated) == MixtralConfig.load(ckpt)
    reference = load_attention(ckpt).tensors
    for other in (sharded, consolidated):
        tensors = load_attention(other).tensors
        assert tensors.keys() == reference.keys()
        for name, t in reference.items():
            torch.testing.assert_close(tensors[name], t, atol=0, rtol=0, msg=name)
    everything = {0: [0, 3]}
    torch.testing.assert_close(
        load_experts(consolidated, everything).tensors, load_experts(ckpt, everything).tensors
    )


def test_model_runs_from_consolidated(ckpt: Path, tmp_path: Path) -> None:
    model, _ = load_local(write_consolidated(ckpt, tmp_path / "c"))
    assert model.cfg.rope_theta == SPEC.rope_theta


def broken_copy(ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(ckpt, out)
    return out


def test_truncated_file_is_a_clear_error(ckpt: Path, tmp_path: Path) -> None:
    d = broken_copy(ckpt, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_attention(d)


def test_missing_tensor_names_the_tensor(ckpt: Path, tmp_path: Path) -> None:
    d = broken_copy(ckpt, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*missing"):
        load_attention(d)


def test_shape_mismatch_names_tensor_and_file(ckpt: Path, tmp_path: Path) -> None:
    d = broken_copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"experts\.0\.w1\.weight.*model\.safetensors.*\(48, 32\).*\(64, 32\)"
    ):
        load_experts(d, {0: [0]})


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither config.json nor params.json"):
        MixtralConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        MixtralConfig.load(tmp_path / "nope")


def test_rope_theta_read_from_both_config_styles() -> None:
    base = MixtralConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=8).to_hf()
    new_style = {**base, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "head_dim": None}
    del new_style["rope_theta"]
    assert MixtralConfig.from_hf(new_style).rope_theta == 1e6
    assert MixtralConfig.from_hf(new_style).head_dim == 16
    del base["rope_theta"]
    with pytest.raises(ConfigError, match="rope_theta"):
        MixtralConfig.from_hf(base)
