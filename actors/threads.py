"""torch's threads in processes that share a node's cores by phases.

On a node shared by a dispatcher and expert shards, the work moves: the dispatcher's attention runs
while the shards wait, then the shards' experts while the dispatcher waits. So each process may use
all of the node's cores for its phase (`num_threads=0`), provided that a waiting process does not
keep them busy: OpenMP's worker threads spin for a while after each parallel region (libgomp, torch's
OpenMP on Linux: up to GOMP_SPINCOUNT iterations, ~0.3 ms; Intel's OpenMP: KMP_BLOCKTIME, 200 ms),
stealing the cores from the process whose phase it is. A passive wait policy makes them sleep at
once. OpenMP reads these variables when it loads, before any of our code runs: they are set in the
actor's environment (`runtime_env`), not here. Measured in docs/performance.md (issue 21).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

WaitPolicy = Literal["passive", "active"]
PASSIVE_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0", "KMP_BLOCKTIME": "0"}


def omp_env(policy: WaitPolicy) -> dict[str, str]:
    """The environment an actor's process needs for OpenMP's `policy` (active: OpenMP's defaults)."""
    return dict(PASSIVE_ENV) if policy == "passive" else {}


def runtime_env(policy: WaitPolicy) -> dict[str, dict[str, str]]:
    """Ray's `runtime_env` for an actor with `policy` ({} for OpenMP's defaults)."""
    env = omp_env(policy)
    return {"env_vars": env} if env else {}


def node_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(num_threads: int) -> int:
    """torch's intra-op threads for this process: `num_threads`, or every core of the node when 0."""
    n = num_threads or node_cores()
    torch.set_num_threads(n)
    return n


def thread_report() -> dict[str, object]:
    """What this process runs with: torch's threads and OpenMP's wait settings (stats, `moray status`)."""
    return {"torch_threads": torch.get_num_threads(),
            "omp_env": {k: os.environ[k] for k in PASSIVE_ENV if k in os.environ}}
