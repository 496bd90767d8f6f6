"""One layer's hop through `ShardedExperts` and the data plane, without Ray: two echo shard endpoints in
child processes, the dispatcher's `DataPlane` in this one (an in-memory directory stands in for the GCS).

What `moray bench --hop` times for "shm" / "socket", minus Ray's actors around it, so it can be profiled
and repeated quickly. Usage (the project's .venv python):

    python hop_bare.py [--transport auto|socket] [--rows 1,16,64,256] [--iters 2000] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from moray.actors.dataplane.channel import ChannelSpec
from moray.actors.dataplane.directory import Directory
from moray.actors.dataplane.table import DataPlane
from moray.actors.placement import Placement
from moray.actors.sharded import ShardedExperts

DIM = 1024
SHARD = """
import json, sys, threading, torch
from moray.actors.dataplane.endpoint import ShardEndpoint
from moray.actors.dataplane.frames import Limits
torch.set_num_threads(1)
ep = ShardEndpoint(lambda layer, x, ids, gates, tags: x, Limits(0, %d, torch.float32, 1))
print(json.dumps(ep.address()), flush=True)
sys.stdin.read()
""" % DIM


class Fixed(Directory):
    def __init__(self, endpoints: list[dict[str, Any]]) -> None:
        super().__init__("bare")
        self.found = endpoints

    def endpoints(self) -> list[dict[str, Any]]:
        return self.found

    def forget(self, shard: int, replica: str, beat: object) -> None:
        pass


async def measure(transport: str, rows: list[int], iters: int, profile: str | None) -> dict[int, float]:
    procs = [subprocess.Popen([sys.executable, "-c", SHARD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        found = [{**json.loads(p.stdout.readline()), "shard": s, "replica": f"r{s}", "node": None, "beat": 0}
                 for s, p in enumerate(procs)]  # type: ignore[union-attr]
        plane = DataPlane(Fixed(found), ChannelSpec(max(rows), DIM, torch.float32), 2, node=None,
                          transport="auto" if transport == "auto" else "socket")
        experts = ShardedExperts(Placement.round_robin(1, 2, 2), plane, shard_timeout_s=30.0)
        out = {}
        prof = cProfile.Profile() if profile else None
        for n in rows:
            x = torch.randn(n, DIM)
            ids = torch.tensor([[0, 1]]).expand(n, 2).contiguous()  # expert 0 on shard 0, 1 on shard 1
            gates = torch.full((n, 2), 0.5)
            for _ in range(max(iters // 10, 20)):
                await experts(0, x, ids, gates)
            times = []
            if prof:
                prof.enable()
            for _ in range(iters):
                start = time.perf_counter()
                y = await experts(0, x, ids, gates)
                times.append(time.perf_counter() - start)
            if prof:
                prof.disable()
            assert torch.equal(y, 2 * x)
            out[n] = statistics.median(times) * 1e6
        if prof and profile:
            prof.dump_stats(profile)
        plane.close()
        return out
    finally:
        for p in procs:
            p.stdin.close()  # type: ignore[union-attr]
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transport", default="auto", choices=["auto", "socket"])
    ap.add_argument("--rows", default="1,16,64,256")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--profile")
    a = ap.parse_args()
    torch.set_num_threads(1)
    res = asyncio.run(measure(a.transport, [int(r) for r in a.rows.split(",")], a.iters, a.profile))
    print(json.dumps({"transport": a.transport, "p50_us": {n: round(v) for n, v in res.items()}}))


if __name__ == "__main__":
    main()
