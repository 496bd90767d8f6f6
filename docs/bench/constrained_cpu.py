"""CPU time, not wall time, of `moray bench --local --preset tiny --constrained F`'s workload on the product
path (the engine in process, as `LocalTarget` builds it; the same 32 jobs of 64 in / 64 out, greedy, F of
them constrained by `BENCH_SCHEMA`), torch on one thread: the engine's sampling CPU ms a step and the
whole process's CPU ms a step. On a shared machine wall times swing with other processes; CPU time only
a little (caches and memory bandwidth are still shared). One JSON line a run, appended to OUT.

    python docs/bench/constrained_cpu.py F CONCURRENCY TAG OUT
    PYTHONPATH=/tmp/base python ... # the same for another tree (an archive of main with `moray/` on top)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import torch

from moray.deploy.bench.targets import LocalTarget, engine_config
from moray.deploy.bench.workload import Job, LengthDist, drive, make_jobs
from moray.model import engine as eng
from moray.model.tiny import PRESETS, default_model_dir


def main() -> None:
    fraction, concurrency, tag, out = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    model_dir = default_model_dir(PRESETS["tiny"])  # `--preset tiny`'s checkpoint
    target = LocalTarget(str(model_dir), engine_config(argparse.Namespace(concurrency=[1, concurrency],
                                                                          max_batch_tokens=2048), False))
    # `moray bench --num-requests 32 --output-len 64` at this concurrency, first repeat (seed 0)
    jobs = make_jobs(32, LengthDist.parse("64"), LengthDist.parse("64"), 32768, concurrency, fraction)
    sampling = [0.0]
    original = eng.AsyncEngine._sample

    def timed(self: eng.AsyncEngine, *args: Any) -> None:
        start = time.thread_time()
        original(self, *args)
        sampling[0] += time.thread_time() - start

    eng.AsyncEngine._sample = timed  # type: ignore[method-assign]

    async def run() -> dict[str, Any]:
        await drive(target.stream, [Job(jobs[0].prompt_ids[:8], 2)], 1, progress=False)  # warm up
        sampling[0], steps0 = 0.0, target.engine.times.steps
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await drive(target.stream, jobs, concurrency, progress=False)
        steps = target.engine.times.steps - steps0
        return {"tag": tag, "constrained": fraction, "concurrency": concurrency, "steps": steps,
                "sampling_cpu_ms_per_step": 1e3 * sampling[0] / steps,
                "cpu_ms_per_step": 1e3 * (time.process_time() - cpu0) / steps,
                "wall_s": time.perf_counter() - wall0, "engine": eng.__file__}

    result = asyncio.run(run())
    print(json.dumps(result))
    with open(out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
