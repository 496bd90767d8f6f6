"""Servers `moray bench` measures over HTTP: streaming OpenAI completions (`HttpTarget`: token-id
prompts, `ignore_eos`, `logprobs=0` so every token is its own chunk) against any server; `ServeTarget`
starts moray's Serve app in this Ray first, `VllmTarget` starts vLLM's CPU build from its own venv
(the peer docs/performance.md compares with) and stops it after.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from moray.deploy.app import run_app
from moray.deploy.bench.targets import ensure_ray
from moray.deploy.bench.workload import Job, UsageCount
from moray.deploy.serve.config import ServerConfig
from moray.deploy.serve.network import free_port
from moray.deploy.serve.state import deployment_states, shard_name

log = logging.getLogger(__name__)


READY_S = 600.0


class HttpTarget:
    """Streaming `/v1/completions` against `base_url` (no `/v1`), one chunk per token."""

    def __init__(self, base_url: str, logprobs: bool = True, model: str | None = None,
                 transport: Any = None) -> None:
        import httpx

        self.base_url, self.logprobs, self.transport = base_url.rstrip("/"), logprobs, transport
        self.model = model or httpx.get(f"{self.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
        self._client: Any = None
        self.has_status = True  # moray's /v1/moray/status; False once the server answers otherwise

    def client(self) -> Any:
        import httpx

        if self._client is None:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=30.0), limits=limits,
                                             transport=self.transport)
        return self._client

    async def stream(self, job: Job) -> AsyncIterator[int]:
        payload: dict[str, Any] = {"model": self.model, "prompt": job.prompt_ids,
                                   "max_tokens": job.max_tokens, "temperature": 0.0, "ignore_eos": True,
                                   "stream": True,
                                   "stream_options": {"include_usage": True}}
        if self.logprobs:
            payload["logprobs"] = 0
        if job.schema is not None:
            schema = {"name": "bench", "schema": job.schema, "strict": True}
            payload["response_format"] = {"type": "json_schema", "json_schema": schema}
        counted = 0
        async with self.client().stream("POST", f"{self.base_url}/v1/completions", json=payload) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for chunk in _sse(r.aiter_lines()):
                for choice in chunk.get("choices") or []:
                    if choice.get("text") or choice.get("logprobs"):
                        counted += 1
                        yield 1
                done = (chunk.get("usage") or {}).get("completion_tokens", 0)
                if done > counted:
                    yield UsageCount(done - counted)
                    counted = done

    async def snapshot(self) -> dict[str, Any]:
        """moray's engine stats (`/v1/moray/status`), {} from other servers."""
        if not self.has_status:
            return {}
        r = await self.client().get(f"{self.base_url}/v1/moray/status")
        self.has_status = r.status_code == 200
        return dict(r.json().get("dispatcher") or {}) if self.has_status else {}

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def close(self) -> None:
        self._client = None


async def _sse(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"stream error: {chunk['error'].get('message')}")
        yield chunk


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = READY_S) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


class ServeTarget(HttpTarget):
    """moray's Serve app (`deploy/app.py`) in this process's Ray, measured over HTTP."""

    def __init__(self, model_dir: str, num_shards: int, max_seqs: int, pingpong: bool, logprobs: bool,
                 **overrides: Any) -> None:
        self.config = ServerConfig(model=model_dir, served_model_name="moray-bench", num_shards=num_shards,
                                   max_num_seqs=max(max_seqs, 1), max_waiting=256, api_key=None,
                                   pingpong=pingpong, port=free_port(), **overrides)
        cfg = self.config
        replicas = cfg.shard_max_replicas if cfg.autoscaling else cfg.shard_min_replicas
        ensure_ray(self.config.dispatcher_cpus + num_shards * replicas * self.config.shard_cpus)
        run_app(self.config, proxy_location="HeadOnly")
        url = f"http://127.0.0.1:{self.config.port}"
        wait_ready(f"{url}/health")
        super().__init__(url, logprobs, "moray-bench")

    async def snapshot(self) -> dict[str, Any]:
        from ray import serve

        stats = await super().snapshot()
        handles = [serve.get_deployment_handle(shard_name(g), self.config.app_name)
                   for g in range(self.config.num_shards)]
        infos = await asyncio.gather(*(h.info.remote() for h in handles))
        return {**stats, "shard_busy_s": [float(i["busy_s"]) for i in infos]}

    def replicas(self) -> dict[str, int]:
        states = deployment_states(self.config.app_name)
        return {name: sum(d["replicas"].values()) for name, d in states.items()}

    def close(self) -> None:
        from ray import serve

        super().close()
        serve.shutdown()


class VllmTarget(HttpTarget):
    """vLLM's OpenAI server (CPU build) on the same checkpoint, started from `python` and stopped after."""

    def __init__(self, python: str, model_dir: str, kv_gib: float, logprobs: bool) -> None:
        port = free_port()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(int(kv_gib) if kv_gib >= 1 else kv_gib)}
        self.log_path = Path(tempfile.mkstemp(prefix="moray-bench-vllm-", suffix=".log")[1])
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--tokenizer-mode",
               "mistral", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)]
        log.info("starting vLLM (log %s): %s", self.log_path, " ".join(cmd))
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_ready(f"http://127.0.0.1:{port}/v1/models", self.proc)
        except Exception:
            self.close()
            raise RuntimeError(f"vLLM did not start; see {self.log_path}") from None
        super().__init__(f"http://127.0.0.1:{port}", logprobs)

    def close(self) -> None:
        super().close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its workers
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
