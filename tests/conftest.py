"""Session fixtures: tiny random checkpoints (made once), the device, one local Ray for the session."""

from __future__ import annotations

import os
from collections.abc import Iterator
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
