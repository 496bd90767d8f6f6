"""Expert token counters (issue 10): exactly top-k per token per layer, matching the router in process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from moray.actors.runtime import start_runtime
from moray.deploy.routing import expert_counts, record_routing
from moray.model.config import MixtralConfig
from moray.model.engine import EngineConfig, GenerateRequest
from moray.model.mixtral import load_local
from moray.model.sampling import SamplingParams


def test_counters_equal_router_decisions(ray_session: Any, tiny_dir: Path) -> None:
    cfg = MixtralConfig.load(tiny_dir)
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(3, 32000, (n,), generator=g).tolist() for n in (5, 17, 30)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    rt = start_runtime(str(tiny_dir), 3, EngineConfig(max_model_len=256, block_size=8))
    try:
        fed = []
        for p in prompts:  # one at a time: each sequence's forward pass is the same as in process
            events = rt.generate(GenerateRequest(p, params))
            fed.append(p + [e.token_id for e in events][:-1])  # the last token is never fed back
        counted = np.sum([np.array(c) for c in ray.get([s.token_counts.remote() for s in rt.shards])], axis=0)
    finally:
        rt.shutdown()
    tokens = sum(len(f) for f in fed)
    assert (counted.sum(axis=1) == cfg.top_k * tokens).all()  # every layer: top-2 per token, exactly
    model, experts = load_local(tiny_dir)
    expected = sum(expert_counts(record_routing(model, experts, f), cfg.n_experts) for f in fed)
    np.testing.assert_array_equal(counted, expected)
