"""Session fixtures: tiny random checkpoints (made once), the device, one local Ray for the session, and
`teacher_forced`: scoring a token sequence through a served moray app."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

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


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One local Ray for the whole session: a simulated 3-node cluster (head + two expert nodes).

    The expert nodes carry a custom `expert_node` resource so tests can pin shards onto them.
    """
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": {"head_node": 1}})
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

    def agreement(self, other: Scored) -> float:
        """Share of positions where both models' most likely next tokens are the same."""
        assert self.tokens == other.tokens, "scores of different sequences"
        return sum(a == b for a, b in zip(self.argmax, other.argmax, strict=True)) / len(self.argmax)

    def mean_abs_delta(self, other: Scored) -> float:
        """Mean |difference| of the given tokens' logprobs (score a reference model's greedy output to
        get the reference's choices)."""
        assert self.tokens == other.tokens, "scores of different sequences"
        deltas = [abs(a - b) for a, b in zip(self.logprobs, other.logprobs, strict=True)]
        return sum(deltas) / len(deltas)


def score_tokens(base_url: str, model: str, tokens: list[int], api_key: str = "unused") -> Scored:
    """Score `tokens` (ids, BOS included if wanted) through a served app's `/v1/completions` as users and
    lm-evaluation-harness do: `echo` + `logprobs`, `max_tokens` 0, with the official `openai` client. The
    legacy `token_logprobs` give the logprobs; vLLM's `prompt_logprobs` (asked for in the same request,
    k = 1) give the ids of the most likely tokens (rank 1)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300.0)
    out = client.completions.create(model=model, prompt=tokens, echo=True, logprobs=1, max_tokens=0,
                                    temperature=0, extra_body={"prompt_logprobs": 1})
    choice = out.choices[0]
    assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    legacy = choice.logprobs.token_logprobs
    ranked = (choice.model_extra or {})["prompt_logprobs"]
    assert len(legacy) == len(ranked) == len(tokens) and legacy[0] is None and ranked[0] is None
    argmax = [next(int(t) for t, e in entry.items() if e["rank"] == 1) for entry in ranked[1:]]
    return Scored(list(tokens), [float(lp) for lp in legacy[1:]], argmax)


@pytest.fixture(scope="session")
def teacher_forced() -> Callable[..., Scored]:
    """`teacher_forced(base_url, model, tokens, api_key="unused") -> Scored` (`score_tokens`)."""
    return score_tokens
