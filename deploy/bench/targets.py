"""What `moray bench` measures in this process or over Ray: the engine in process (`LocalTarget`), the
expert-parallel runtime on Ray actors (`ActorsTarget`), and transformers' `generate` (`TransformersTarget`,
static left-padded batches: the baseline users would pick first; per-token times from a
`StoppingCriteria` that stamps every generation step). `ensure_ray` / `stop_ray` start and stop a
local Ray only when the benchmark needs one and none is connected.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from moray.deploy.bench.workload import Job, RequestRecord, summarize

log = logging.getLogger(__name__)


def generate_request(job: Job) -> Any:
    from moray.model.engine import GenerateRequest
    from moray.model.sampling import SamplingParams
    from moray.model.structured import Constraint

    constraint = None if job.schema is None else Constraint.json_schema(job.schema)
    return GenerateRequest(list(job.prompt_ids), SamplingParams(max_tokens=job.max_tokens, temperature=0.0,
                                                                ignore_eos=True, constraint=constraint))


def engine_config(args: argparse.Namespace, pingpong: bool, deterministic: bool = False) -> Any:
    from moray.model.engine import EngineConfig

    seqs = max(max(args.concurrency), 1)
    return EngineConfig(max_num_seqs=seqs, max_batch_tokens=args.max_batch_tokens, pingpong=pingpong,
                        deterministic=deterministic)


class ExpertCounter:
    """An `ExpertBackend` wrapper counting distinct experts per layer call (for the bandwidth bound)."""

    def __init__(self, inner: Any, num_experts: int) -> None:
        self.inner, self.num_experts = inner, num_experts
        self.calls: dict[int, list[int]] = {}  # rows in the call -> [calls, distinct experts summed]
        self.loads: dict[int, Any] = {}  # layer -> [E] tokens routed to each expert

    async def __call__(self, layer: int, x: Any, ids: Any, gates: Any) -> Any:
        import torch

        tally = self.calls.setdefault(int(x.shape[0]), [0, 0])
        tally[0] += 1
        counts = torch.bincount(ids.flatten(), minlength=self.num_experts)  # [E]
        tally[1] += int((counts > 0).sum())
        self.loads[layer] = self.loads.get(layer, 0) + counts
        return await self.inner(layer, x, ids, gates)

    def touched(self, max_rows: int) -> float | None:
        """Mean distinct experts per layer over calls of at most `max_rows` tokens (decode steps)."""
        calls = sum(c for rows, (c, _) in self.calls.items() if rows <= max_rows)
        return sum(d for rows, (_, d) in self.calls.items() if rows <= max_rows) / calls if calls else None


class LocalTarget:
    """The engine in this process, all experts local (`load_local`), in `dtype` ("float32", "bfloat16"),
    `quantization` None or "int8" (experts), with the kernels the probe picks here (`kernel_report`)."""

    def __init__(self, model_dir: str, engine_config: Any, dtype: str = "float32",
                 quantization: str | None = None) -> None:
        from moray.actors.experts import resolve_dtype
        from moray.model.engine import AsyncEngine
        from moray.model.kernels import KernelOptions
        from moray.model.mixtral import load_local
        from moray.model.tokenizer import Tokenizer

        det, options = engine_config.deterministic, KernelOptions(quantization)
        kernels = options.kernels(deterministic=det)
        attention = options.kernels(attention=True, deterministic=det)
        model, experts = load_local(model_dir, dtype=resolve_dtype(dtype), deterministic=det, kernels=kernels,
                                    attention_kernels=attention)
        self.kernel_report = {**attention.report(), **kernels.report()}
        self.counter = ExpertCounter(experts, model.cfg.n_experts)
        self.engine = AsyncEngine(model, self.counter, Tokenizer.from_model_dir(model_dir), engine_config)

    async def stream(self, job: Job) -> AsyncIterator[int]:
        async for _ in self.engine.generate(generate_request(job)):
            yield 1

    async def snapshot(self) -> dict[str, Any]:
        return dict(self.engine.stats())

    def close(self) -> None:
        self.counter.calls.clear()


class ActorsTarget:
    """The expert-parallel runtime on Ray actors (`start_runtime`): a dispatcher and N shards."""

    def __init__(self, model_dir: str, num_shards: int, engine_config: Any, threads: int,
                 placement: Any = None, transport: str = "auto", omp_wait_policy: str = "passive") -> None:
        from moray.actors.runtime import RuntimeOptions, start_runtime

        ensure_ray(1.0 + 0.5 * (placement.num_shards if placement else num_shards))
        options = RuntimeOptions(threads=threads, transport=transport,  # type: ignore[arg-type]
                                 omp_wait_policy=omp_wait_policy)  # type: ignore[arg-type]
        self.runtime = start_runtime(model_dir, num_shards, engine_config, placement=placement,
                                     options=options)

    async def stream(self, job: Job) -> AsyncIterator[int]:
        async for _ in self.runtime.stream(generate_request(job)):
            yield 1

    async def snapshot(self) -> dict[str, Any]:
        stats = await self.runtime.dispatcher.stats.remote()
        infos = await asyncio.gather(*(s.info.remote() for s in self.runtime.shards))
        return {**stats, "shard_busy_s": [float(i["busy_s"]) for i in infos]}

    def close(self) -> None:
        self.runtime.shutdown()


class TransformersTarget:
    """`MixtralForCausalLM.generate` on static batches of `concurrency` requests (left padding)."""

    def __init__(self, model_dir: str, experts_implementation: str | None = None) -> None:
        import torch
        import transformers

        extra: dict[str, Any] = {}
        if experts_implementation:  # transformers 5 defaults to "grouped_mm"; "eager" is its loop
            extra["experts_implementation"] = experts_implementation
        self.model = transformers.MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                     **extra).eval()
        self._generate([Job([5, 6, 7, 8], 2)])  # warm-up

    def run_batch(self, jobs: Sequence[Job], concurrency: int, progress: bool) -> dict[str, Any]:
        from tqdm import tqdm

        records: list[RequestRecord] = []
        start = time.perf_counter()
        for i in tqdm(range(0, len(jobs), concurrency), desc=f"transformers c={concurrency}", leave=False,
                      disable=not progress):
            records += self._generate(jobs[i:i + concurrency])
        return {**summarize(records, start, time.perf_counter()), "step": None}

    def _generate(self, batch: Sequence[Job]) -> list[RequestRecord]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps: list[float] = []

        class Stamp(StoppingCriteria):  # type: ignore[misc]
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        width, new = max(len(j.prompt_ids) for j in batch), max(j.max_tokens for j in batch)
        ids = torch.tensor([[0] * (width - len(j.prompt_ids)) + j.prompt_ids for j in batch])  # [B, S]
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in batch])
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=0,
                                stopping_criteria=StoppingCriteriaList([Stamp()]))
        return [RequestRecord(len(j.prompt_ids), start, stamps[:j.max_tokens], j.max_tokens,
                              stamps[j.max_tokens - 1]) for j in batch]

    def close(self) -> None:
        del self.model
        gc.collect()


_started_ray = False  # whether `ensure_ray` started the Ray this process is connected to


def ensure_ray(cpus_needed: float) -> None:
    """A fresh local Ray with at least `cpus_needed` logical CPUs (the cores, or more when asked); a
    Ray this process is already connected to (a caller's own cluster) is used as it is."""
    global _started_ray
    import ray

    if not ray.is_initialized():
        _started_ray = True
        # Ray starts workers at nice 15 by default; on a shared machine that hands them last place
        # behind everything else, while the in-process engine and the peers run at nice 0.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)),
                 log_to_driver=False, include_dashboard=False)
        signal.signal(signal.SIGTERM, interrupt)  # ray.init replaced it


def stop_ray() -> None:
    """Shut down the Ray that `ensure_ray` started (never a caller's own connection)."""
    global _started_ray
    import ray

    if _started_ray and ray.is_initialized():
        ray.shutdown()
    _started_ray = False


def interrupt(signum: int, _: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every target's close()
