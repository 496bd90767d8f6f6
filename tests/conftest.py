"""Session fixtures: tiny random checkpoints (made once), the device, one local Ray for the session, and
`teacher_forced`: scoring a token sequence through a served moray app; `teacher_forced_local`: the same in
process; FP8 checkpoints written by the compressed-tensors library (`make_fp8`, `dequantize_fp8`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny spec (4 layers, 8 experts, GQA 2), unsharded."""
    from moray.model.tiny import TinySpec, make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"), TinySpec())


@pytest.fixture(scope="session")
def tiny4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 experts per layer (so 4 shards can hold one expert each), sharded safetensors."""
    from moray.model.tiny import TinySpec, make_tiny

    spec = TinySpec(layers=2, dim=64, heads=4, kv_heads=2, experts=4, hidden=128, seed=3)
    return make_tiny(tmp_path_factory.mktemp("tiny4"), spec, shards=2)


# The small preset's hidden sizes (D 1024, F 3584) with fewer layers, experts and vocabulary, so that it loads
# in a second: the quantization tests' second model (int8's error grows with K; the tiny model's D is 128).
HIDDEN_SIZE_SPEC = dict(layers=2, dim=1024, heads=8, kv_heads=2, experts=4, hidden=3584, vocab=4096, seed=3)


@pytest.fixture(scope="session")
def hidden_size_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random checkpoint at the small preset's hidden sizes (`HIDDEN_SIZE_SPEC`), made once."""
    from moray.model.tiny import TinySpec, make_tiny

    return make_tiny(tmp_path_factory.mktemp("hidden-size"), TinySpec(**HIDDEN_SIZE_SPEC))


@pytest.fixture(scope="session")
def make_fp8(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_fp8(plain_dir, strategy, fmt=None)`: an FP8 copy of a plain checkpoint, written by the
    compressed-tensors library (tests/fp8_checkpoint.py), made once per argument set in the session."""
    made: dict[tuple[Path, str, str | None], Path] = {}

    def make(src: Path, strategy: str, fmt: str | None = None) -> Path:
        key = (src, strategy, fmt)
        if key not in made:
            made[key] = write_fp8(src, tmp_path_factory.mktemp(f"fp8-{strategy}") / "ckpt", strategy, fmt)
        return made[key]

    return make


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One local Ray for the whole session: a simulated 3-node cluster (head + two expert nodes).

    The expert nodes carry a custom `expert_node` resource so tests can pin shards onto them.
    """
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Metrics exported every 2 s (Ray's default is 10 s): the tests that scrape them wait less.
    head = {"num_cpus": 4, "resources": {"head_node": 1},
            "_system_config": {"metrics_report_interval_ms": 2000}}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for i in range(2):
        cluster.add_node(num_cpus=2, resources={"expert_node": 2, f"expert_node_{i}": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@dataclass(frozen=True)
class Scored:
    """A token sequence scored teacher-forced by a served model: entry i is about tokens[i + 1], given
    tokens[: i + 1]."""

    tokens: list[int]
    logprobs: list[float]  # log p(tokens[i + 1] | tokens[: i + 1])
    argmax: list[int]  # the model's most likely token after tokens[: i + 1]
    top: list[dict[int, float]]  # the k most likely next tokens after tokens[: i + 1] -> their logprobs


def score_tokens(base_url: str, model: str, tokens: list[int], api_key: str = "unused",
                 top: int = 1) -> Scored:
    """Score `tokens` (ids, BOS included if wanted) through a served app's `/v1/completions` as users and
    lm-evaluation-harness do: `echo` + `logprobs`, `max_tokens` 0, with the official `openai` client. The
    legacy `token_logprobs` give the logprobs; vLLM's `prompt_logprobs` (asked for in the same request,
    k = `top`) give the ids of the most likely tokens (rank 1) and the `top` most likely ones' logprobs."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300.0)
    out = client.completions.create(model=model, prompt=tokens, echo=True, logprobs=1, max_tokens=0,
                                    temperature=0, extra_body={"prompt_logprobs": top})
    choice = out.choices[0]
    assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    legacy = choice.logprobs.token_logprobs
    ranked = (choice.model_extra or {})["prompt_logprobs"]
    assert len(legacy) == len(ranked) == len(tokens) and legacy[0] is None and ranked[0] is None
    argmax = [next(int(t) for t, e in entry.items() if e["rank"] == 1) for entry in ranked[1:]]
    best = [{int(t): float(e["logprob"]) for t, e in entry.items() if e["rank"] <= top}
            for entry in ranked[1:]]
    return Scored(list(tokens), [float(lp) for lp in legacy[1:]], argmax, best)


@pytest.fixture(scope="session")
def teacher_forced() -> Callable[..., Scored]:
    """`teacher_forced(base_url, model, tokens, api_key="unused", top=1) -> Scored` (`score_tokens`)."""
    return score_tokens


@pytest.fixture(scope="session")
def dequantize_fp8() -> Callable[[Path, Path], Path]:
    """`dequantize_fp8(fp8_dir, dst)`: the plain fp32 checkpoint an FP8 one stands for."""
    return dequantize_fp8_checkpoint


def local_logprobs(path: Path, tokens: list[int], options: Any, cache_dir: Path,
                   block: int = 16) -> torch.Tensor:
    """log p(next | prefix) [n, V] at every position of `tokens`, one prefill through the in-process model
    (`load_local`) with the kernels of `options` (a `KernelOptions`)."""
    from moray.model.kv_cache import KVCache
    from moray.model.layers import StepBatch
    from moray.model.mixtral import load_local

    model, experts = load_local(path, kernels=options.kernels(cache_dir=cache_dir),
                                attention_kernels=options.kernels(attention=True, cache_dir=cache_dir))
    blocks = list(range(-(-len(tokens) // block)))
    kv = KVCache(model.cfg, num_blocks=len(blocks), block_size=block, dtype=torch.float32, device="cpu")
    batch = StepBatch.for_sequence(tokens, 0, blocks, block, all_logits=True)
    with torch.no_grad():
        logits = asyncio.run(model.forward_step(batch, kv, experts))
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.fixture(scope="session")
def teacher_forced_local() -> Callable[..., torch.Tensor]:
    """`teacher_forced_local(path, tokens, kernel_options, cache_dir) -> logprobs [n, V]`
    (`local_logprobs`)."""
    return local_logprobs


# ---- FP8 checkpoints written by the compressed-tensors library ------------------------------------------
# From a plain checkpoint (the tiny model): every Linear's weight FP8 with a scale per tensor or per output
# channel, lm_head and the routers left unquantized (`ignore`), as public Mixtral FP8 checkpoints do.
FP8_IGNORE = ["lm_head", "re:.*block_sparse_moe.gate$"]


def modules_of(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module tree with the checkpoint's names: a `torch.nn.Linear` for each 2-D weight but the embedding,
    so the library's `Linear` target finds the checkpoint's linears."""
    root = torch.nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        parent = root
        for i, part in enumerate(path):
            if not hasattr(parent, part):
                linear = i == len(path) - 1 and leaf == "weight" and t.dim() == 2 and "embed" not in name
                parent.add_module(part, torch.nn.Linear(t.shape[1], t.shape[0], bias=False) if linear
                                  else torch.nn.Module())
            parent = getattr(parent, part)
        if isinstance(parent, torch.nn.Linear):
            parent.weight.data = t
        else:
            parent.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    return root


def write_fp8(src: Path, dst: Path, strategy: str, fmt: str | None = None) -> Path:
    """`src` (plain safetensors + config.json + tokenizer) -> `dst` in FP8, `strategy` "tensor" | "channel";
    `fmt` None: the format the library infers ("naive-quantized"), or one it is told ("float-quantized")."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(f))
    model = modules_of(state)
    weights = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=FP8_IGNORE)
    apply_quantization_config(model, config, show_progress=False)
    for m in model.modules():
        if hasattr(m, "weight_scale"):  # the library's min/max qparams, per tensor or per output row
            w = m.weight.detach()
            lo, hi = (w.amin(), w.amax()) if strategy == "tensor" else (w.amin(1, True), w.amax(1, True))
            scale, _ = calculate_qparams(lo, hi, weights)
            m.weight_scale.data = scale.reshape(m.weight_scale.shape).to(m.weight_scale.dtype)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    save_file({n: t.contiguous() for n, t in model.state_dict().items()}, str(dst / "model.safetensors"))
    compressor.update_config(str(dst))
    return dst


def dequantize_fp8_checkpoint(fp8_dir: Path, dst: Path) -> Path:
    """The oracle: `fp8_dir` with every FP8 weight turned by hand into fp32 `weight.float() * scale`."""
    shutil.copytree(fp8_dir, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(fp8_dir / "model.safetensors")
    plain = {}
    for name, t in state.items():
        if name.endswith(".weight") and name + "_scale" in state:
            plain[name] = t.float() * state[name + "_scale"].float().reshape(-1, 1)
        elif not name.endswith(("_scale", "_zero_point")):
            plain[name] = t
    save_file(plain, str(dst / "model.safetensors"))
    config = dst / "config.json"
    cfg = json.loads(config.read_text())
    del cfg["quantization_config"]
    config.write_text(json.dumps(cfg))
    return dst
