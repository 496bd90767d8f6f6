"""Quantized serving scored through the server the way users score a model (issue 23's acceptance): an app
scores 512 positions teacher-forced with `echo` + `logprobs` (and vLLM's `prompt_logprobs`;
`tests/conftest.py` `score_tokens`), and each expert-shard replica's resident expert bytes come from the
replicas' own reports (`/v1/moray/status`, what `moray status` prints).

- int8 (`--quantization int8`, the experts), against the fp32 model of the same checkpoint in process: it
  picks fp32's next token at >= 97 % of the positions and moves the logprob of fp32's choice by <= 0.05
  on average, on the tiny model and on one at the small preset's hidden sizes; its replicas hold <= 0.27x
  the fp32 bytes of the experts they hold.
- FP8 (a compressed-tensors checkpoint written by the library, kept FP8: `--quantization fp8` with the
  weight-only kernel, CPU's default), against its dequantized fp32 weights (`weight.float() *
  weight_scale`, a plain checkpoint) in process: the same choices everywhere, logprobs within 1e-4; its
  replicas hold <= 0.27x the fp32 bytes of their experts. (Dequantized at load, the path without
  `--quantization`: tests/actors/test_runtime.py.)

The apps start together beside `served_app`, on its proxies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from moray.model.config import MixtralConfig
from moray.model.kernels import KernelOptions

ServedApp = Any  # conftest's `served_app` fixture
POSITIONS = 512
TOP = 20  # prompt_logprobs asked of a quantized app: its 20 most likely tokens hold fp32's choice
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # .../v1
    model_name: str
    model_dir: Path

    def tokens(self) -> list[int]:
        """The in-process test's 512 tokens (tests/model/test_quant.py) and one more: 512 positions scored."""
        vocab = MixtralConfig.load(self.model_dir).vocab_size
        return torch.randint(3, vocab, (POSITIONS + 1,), generator=torch.Generator().manual_seed(1)).tolist()

    def replicas(self) -> dict[str, list[dict[str, Any]]]:
        """Each expert shard's replicas' own reports (placement, resident bytes), from `/v1/moray/status`."""
        r = httpx.get(f"{self.base_url}/moray/status", timeout=TIMEOUT_S)
        assert r.status_code == 200, r.text
        return {shard: s["replicas"] for shard, s in r.json()["shards"].items()}


def fp32_ratios(app: Endpoint) -> list[float]:
    """Resident expert bytes of each of `app`'s shard replicas (their own reports) / the fp32 bytes of the
    experts each holds (4 bytes a parameter)."""
    expert_fp32 = MixtralConfig.load(app.model_dir).expert_bytes(4)
    out = [r["param_bytes"] / (sum(map(len, r["experts"].values())) * expert_fp32)
           for replicas in app.replicas().values() for r in replicas]
    assert out
    return out


# app name -> (checkpoint fixture, quantization, shards): 2 shards for the tiny model (a shard quantizes its
# own experts), as few as that allows (each replica is a process to start); fp8: the tiny model in FP8
# (per-tensor scales), through 2 shards over HTTP
APPS = {"moray-tiny-int8": ("tiny_dir", "int8", 2), "moray-hidden-int8": ("hidden_size_dir", "int8", 1),
        "moray-fp8": ("fp8_dir", "fp8", 2)}


@pytest.fixture(scope="module")
def fp8_dir(tiny_dir: Path, make_fp8: Callable[..., Path]) -> Path:
    return make_fp8(tiny_dir, "tensor", "float-quantized")


@pytest.fixture(scope="module")
def apps(served_app: ServedApp, request: pytest.FixtureRequest) -> Iterator[dict[str, Endpoint]]:
    """`APPS` by name. 8 sequences and 128 tokens a step each (a 513-token prompt is prefilled in 5
    chunks)."""
    from ray import serve

    from moray.deploy.app import build_app

    configs = [served_app.config.model_copy(update={
        "app_name": name, "model": str(request.getfixturevalue(ckpt)), "served_model_name": name,
        "quantization": quantization, "kernel": "fp8-dequant" if quantization == "fp8" else None,
        "num_shards": shards, "max_num_seqs": 8, "max_batch_tokens": 128,
        "max_waiting": 16, "dispatcher_cpus": 0.25, "shard_cpus": 0.25})
        for name, (ckpt, quantization, shards) in APPS.items()]
    serve.run_many([serve.RunTarget(build_app(c), name=c.app_name, route_prefix=f"/{c.app_name}")
                    for c in configs])
    out = {c.app_name: Endpoint(f"{served_app.http_url}/{c.app_name}/v1", c.app_name, Path(str(c.model)))
           for c in configs}
    yield out
    for c in configs:
        serve.delete(c.app_name)


@pytest.mark.parametrize("model", ["tiny", "hidden"])
def test_int8_app_agrees_with_fp32(apps: dict[str, Endpoint], model: str, teacher_forced: Callable[..., Any],
                                   teacher_forced_local: Callable[..., torch.Tensor],
                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """Against the fp32 model of the same checkpoint in process (the served fp32 path equals it:
    test_openai_api's prompt scores against transformers)."""
    int8 = apps[f"moray-{model}-int8"]
    tokens = int8.tokens()
    got = teacher_forced(int8.base_url, int8.model_name, tokens, top=TOP)
    want = teacher_forced_local(int8.model_dir, tokens[:-1], KernelOptions(),
                                tmp_path_factory.mktemp("kernels"))  # [n, V] fp32's logprobs
    choices = want.argmax(dim=-1).tolist()  # fp32's most likely next token at each position
    agreement = sum(a == b for a, b in zip(got.argmax, choices, strict=True)) / len(choices)
    deltas = []
    for i, (top, c) in enumerate(zip(got.top, choices, strict=True)):
        assert c in top, f"position {i}: fp32's token {c} not in int8's top {TOP}"
        deltas.append(abs(top[c] - want[i, c].item()))
    mean = sum(deltas) / len(deltas)
    assert agreement >= 0.97, f"int8 picks fp32's token at {agreement:.1%} of {POSITIONS} positions"
    assert 0 < mean <= 0.05, f"mean |Δ logprob| of fp32's choice: {mean:.4f}"
    assert all(r <= 0.27 for r in fp32_ratios(int8))


def test_fp8_app_equals_its_dequantized_weights(apps: dict[str, Endpoint], fp8_dir: Path,
                                                dequantize_fp8: Callable[[Path, Path], Path],
                                                teacher_forced: Callable[..., Any],
                                                teacher_forced_local: Callable[..., torch.Tensor],
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    fp8 = apps["moray-fp8"]
    tokens = fp8.tokens()
    got = teacher_forced(fp8.base_url, fp8.model_name, tokens, top=TOP)
    plain = dequantize_fp8(fp8_dir, tmp_path_factory.mktemp("fp8-dequantized") / "ckpt")
    want = teacher_forced_local(plain, tokens[:-1], KernelOptions(), tmp_path_factory.mktemp("kernels"))
    assert got.argmax == want.argmax(dim=-1).tolist()
    given = want.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]  # [n] the scored tokens' logprobs
    choices = want.max(dim=-1).values  # [n] the logprob of its own choice
    assert (torch.tensor(got.logprobs) - given).abs().max().item() <= 1e-4
    got_choices = torch.tensor([top[a] for top, a in zip(got.top, got.argmax, strict=True)])  # [n]
    assert (got_choices - choices).abs().max().item() <= 1e-4
    ratios = fp32_ratios(fp8)
    assert len(ratios) == 2 and all(r <= 0.27 for r in ratios), ratios  # 2 shards, FP8 as stored
